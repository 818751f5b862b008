//! 4-bit blockwise quantization (NF4, FP4) bit-exact with bitsandbytes, the codec of QLoRA.
//!
//! # Should I use this crate?
//!
//! Use it to quantize and dequantize weights in the 4-bit formats that bitsandbytes and
//! transformers write (`load_in_4bit=True`): the packed codes, the per-block absmax and its double
//! quantization come out byte for byte as bitsandbytes' CUDA kernels produce them. To read or write
//! whole checkpoint files use `qlora-checkpoint`; for everything at once, the `qlora-nf4` facade.
//!
//! # The format
//!
//! A tensor of `n` elements (flattened row-major) is cut into blocks of `blocksize` elements
//! (32, 64, …, 4096; the last block may be partial). Per block:
//!
//! * `absmax = max |x|` in f32 (NaN ignored, subnormal values flushed to zero);
//! * each element is normalized as `xn = x * inv` in f32 and mapped to a 4-bit code by
//!   bitsandbytes' decision tree (strict `>`: a value exactly on a threshold takes the lower code),
//!   where `inv` is what bitsandbytes' CUDA build (`--use_fast_math`) computes for `1/absmax`: the
//!   GPU's approximate reciprocal `MUFU.RCP`, reproduced from a table measured on an H200
//!   ([`qlora_double_quant::fastmath`]), and inputs and products flush to zero;
//! * codes are packed two per byte, **element 2k in the high nibble of byte k**; an odd length
//!   pads the last low nibble with the code of 0.
//!
//! Dequantization is `T(f32(table[code] * absmax))` with round-to-nearest-even to f16/bf16 (a
//! subnormal product flushed, a NaN the GPU's `0x7fffffff`). With double quantization the absmax
//! values are themselves stored as 8-bit codes (see [`qlora_double_quant`]).
//!
//! **Exactness.** Codes, absmax and dequantized values equal bitsandbytes 0.50.2's CUDA output on
//! an NVIDIA H200 bit for bit for every quant type, block size and dtype (measured on sm_90; other
//! GPU generations unverified; `testdata/bnb-cuda-sm90`). With double quantization the nested
//! codes are exact given the offset; the default offset is the correctly rounded mean, which can
//! be an ulp from torch's GPU mean ([`QuantizedTensor::quantize_with_dq_offset`] takes a stored
//! one). bitsandbytes' *CPU* backend uses an IEEE reciprocal and one-ulp-different NF4 thresholds
//! ([`codebook::NF4_THRESHOLDS_CPU_BACKEND`]), so its codes differ near thresholds.
//!
//! Degenerate blocks follow the CUDA kernels (bitsandbytes' checkpoints were written by them; its
//! CPU path differs, see `docs/numerics.md`):
//!
//! | input | codes | dequantized |
//! |---|---|---|
//! | all-zero block | NF4 0 / FP4 0 (`0 · (1/0)` is NaN, which no threshold exceeds): bytes `0x00` | NF4 −0.0, FP4 +0.0 |
//! | NaN element | 0 (ignored by the absmax) | −absmax (NF4) / +0.0 (FP4) |
//! | ±Inf element | absmax = +inf; the inf itself → 0, finite values → NF4 7 / FP4 0 | the block is lost (NaN / ±inf) |
//!
//! # Example
//!
//! ```
//! use qlora_codec::{QuantizeOptions, QuantizedTensor, QuantType};
//!
//! let weight: Vec<f32> = (0..16384).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
//! let q = QuantizedTensor::quantize(&weight, &[128, 128], QuantizeOptions::qlora())?;
//! assert_eq!(q.quant_type(), QuantType::Nf4);
//! assert_eq!(q.packed().len(), 8192);                  // two codes per byte
//! assert!((q.bits_per_param() - 4.127).abs() < 0.01);  // NF4 + double quant at block 64
//! let back: Vec<f32> = q.dequantize()?;
//! let max_err = weight.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
//! assert!(max_err < 0.16);  // ≤ absmax · (half the widest NF4 gap)
//! # Ok::<(), qlora_codec::Error>(())
//! ```
//!
//! # Numbers
//!
//! | format (block 64) | bits per parameter |
//! |---|---|
//! | bf16 | 16 |
//! | NF4/FP4, f32 absmax | 4.5 |
//! | NF4/FP4, double quant | 4.127 |
//!
//! Error bound: `|x − deq(q(x))| ≤ absmax · g/2` where `g` is the widest gap between adjacent
//! codes ([`QuantType::max_half_gap`]: 0.1519 for NF4, 0.1667 for FP4), plus the rounding of the
//! output dtype.
//!
//! # CPU kernels
//!
//! [`quantize_into`], [`quantize_double_into`], [`dequantize_into`] and
//! [`dequantize_range_into`] run the fastest [`Implementation`] of the CPU, picked once at first
//! use: AVX-512 (one `vpermd`/`vpermw` table lookup per 64-byte output vector, streaming stores
//! for outputs ≥ 16 MiB), AVX2 (with F16C), NEON on aarch64, else the safe scalar oracle
//! ([`scalar`]). [`Implementation`] is `qlora-double-quant`'s, re-exported: one choice per
//! process for every crate's kernels, from CPU features detected once. Every implementation
//! produces the oracle's bytes (tested for each one the machine has); `QLORA_FORCE_SCALAR=1` in
//! the environment forces the oracle, and the methods of [`CodecKernels`] run a chosen one.
//! Tensors of at least
//! [`PARALLEL_THRESHOLD`] elements are split over the rayon pool in ranges of whole blocks.
//! `qlora bench` prints the throughput on the machine at hand. On a 2-core AMD EPYC (Zen 4,
//! 2.6 GHz, AVX-512) VM, 64 Mi elements, block 64, both cores; the memcpy of the same bytes in the
//! same run moved 29–36 GB/s (this shared VM's bandwidth varies over the day from about 25 to 50
//! GB/s, and the ratios with it):
//!
//! | operation | G elements/s | vs memcpy |
//! |---|---|---|
//! | dequantize NF4 + double quant → bf16 | 13.7 | 0.97 |
//! | dequantize NF4 → f32 / → f16 | 6.9 / 13.5 | 0.98 / 1.09 |
//! | quantize f32 → NF4 / FP4 | 4.9–6.1 | 0.72–1.03 |
//! | quantize bf16 → NF4 / FP4 | 7.5–10.4 | 0.61–0.76 |
//! | quantize f16 → NF4 / FP4 | 8.3–9.7 | 0.65–0.83 |
//! | quantize bf16 / f16 → FP4 + double quant | 7.2–9.1 | 0.57–0.68 |
//!
//! (Quantize rows: three `qlora bench` runs, memcpy 23–36 GB/s, load average 1.3–1.5 besides
//! the bench.) Dequantization runs at memory speed (streaming stores for large outputs).
//! Quantization at block 64 runs, in cache on one core, at 6.1–6.6 G elements/s for NF4 and
//! 5.4–6.0 for FP4: per 16 elements a multiply, the bucket search of the AVX-512 kernel (an FMA,
//! two permutes and one compare instead of a 4-step threshold search) and a share of the packing;
//! per 16 blocks one transposing reduction of their maxima and one `vdivps` for their
//! reciprocals, corrected by one lookup per block in the GPU's 2 MiB reciprocal table
//! ([`qlora_double_quant::fastmath::rcp_correction`], prefetched when the absmax is known, a
//! group of blocks ahead). From memory the input is prefetched into L2 12 KiB ahead (hardware
//! prefetchers stop at 4 KiB pages). With double quantization, [`quantize_double_into`] gathers
//! the mean of the absmax values per task while they are in L1 (instead of a serial pass over the
//! 4 MiB vector after quantization, about 0.15 ms of the 0.55 ms it cost at 64 Mi elements, block
//! 64, two cores) and writes into reused buffers; the compression of the 1 Mi absmax values then
//! takes about 0.47 ms on one core (0.65 ms before its centring ran on 16 AVX-512 lanes).
//!
//! `qlora bench --threads 2 --blocksize 64`, quantize as a fraction of the memcpy of the same
//! run, the kernels before the bucket search, the vector reciprocals and the L2 prefetch → after
//! (same bytes), three alternating runs each, same VM, load average 1.3–1.5 besides the bench:
//!
//! | input | NF4 | NF4 + dq | FP4 | FP4 + dq |
//! |---|---|---|---|---|
//! | f32 | 0.43–0.44 → 0.81–1.03 | 0.39–0.43 → 0.73–0.78 | 0.40–0.44 → 0.72–0.80 | 0.38–0.41 → 0.69–0.75 |
//! | bf16 | 0.36–0.46 → 0.70–0.76 | 0.35–0.37 → 0.63–0.68 | 0.36–0.41 → 0.61–0.71 | 0.36–0.38 → 0.57–0.63 |
//! | f16 | 0.36–0.40 → 0.70–0.76 | 0.36–0.38 → 0.61–0.67 | 0.34–0.37 → 0.65–0.83 | 0.32–0.35 → 0.59–0.68 |
//!
//! On a quiet machine memcpy reaches about 45 GB/s and the 16-bit FP4 + double quant cases come
//! to 0.45–0.55 of it (measured one step before the last prefetch change, worth 3–7 % for
//! f16/bf16); quantization is then compute-bound (one core at block 4096, without the
//! per-block work, reaches 7.7 G elements/s for bf16 → NF4).
//!
//! [`quantize_double_into`] (the mean gathered per task, buffers reused, the centring on AVX-512
//! lanes) against the separate `double_quantize_absmax` pass before it, same bytes: 48
//! alternating `qlora bench --threads 2 --blocksize 64 --reps 7` pairs, load average 1.6–1.9 with
//! the bench itself, memcpy 20–47 GB/s (median 31); median G elements/s, before → after:
//!
//! | input | NF4 | NF4 + dq | FP4 | FP4 + dq |
//! |---|---|---|---|---|
//! | f32 | 5.59 → 5.82 | 5.35 → 5.58 | 5.61 → 5.69 | 5.24 → 5.49 |
//! | bf16 | 9.22 → 9.27 | 8.59 → 8.81 | 9.01 → 9.01 | 8.24 → 8.49 |
//! | f16 | 8.87 → 9.02 | 8.16 → 8.77 | 8.46 → 8.74 | 7.79 → 8.33 |
//!
//! Double quantization now costs 3–5 % over plain quantization (7–9 % before). The best runs,
//! 8.98 (f16 FP4 + dq) to 11.3 (bf16 NF4) G elements/s, are 0.47–0.61 of a memcpy at 48 GB/s:
//! the f16 cases with double quant stay just under 0.5 when memcpy runs at full speed.
//!
//! [`QuantizedTensor::gemv`] multiplies a 4-bit matrix by a few token vectors straight from the
//! packed codes (module [`gemv`]: a per-block table of dequantized values looked up with
//! `vpermps` and fused into FMAs), in one documented summation order that every implementation
//! follows, so its results are the same bits everywhere and equal [`gemv::dot`] of the
//! dequantized rows.
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `testing` | proptest strategies and the oracle, for downstream property tests |
// `unsafe` is confined to the SIMD kernels in `arch`; everything else is safe code.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[allow(unsafe_code)]
mod arch;
pub mod codebook;
pub mod gemv;
pub mod int4;
mod kernel;
pub mod scalar;
mod tensor;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

use half::{bf16, f16};

pub use kernel::CodecKernels;
pub use qlora_double_quant::Implementation;
pub use qlora_double_quant::{DoubleQuantAbsmax, NESTED_BLOCKSIZE};
pub use tensor::{Absmax, QuantizeOptions, QuantizedTensor};

/// Block sizes bitsandbytes supports for 4-bit quantization.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Inputs with at least this many elements are split across the rayon pool.
pub const PARALLEL_THRESHOLD: usize = 1 << 18;

/// Errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A block size bitsandbytes does not support.
    #[error("block size {0} is not supported (expected a power of two from 32 to 4096)")]
    BlockSize(usize),
    /// Buffers whose lengths do not fit together.
    #[error("length mismatch for {what}: expected {expected}, found {found}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// The length the other inputs require.
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// A shape whose element count does not fit the data.
    #[error("shape {shape:?} has {numel} elements but the data holds {found}")]
    Shape {
        /// The declared shape.
        shape: Vec<usize>,
        /// Its product.
        numel: usize,
        /// Elements present.
        found: usize,
    },
    /// A quantization type name that is not `nf4` or `fp4`.
    #[error("unknown 4-bit quantization type {0:?} (expected \"nf4\" or \"fp4\")")]
    QuantType(String),
    /// A dtype name that is not a supported float type.
    #[error("unsupported dtype {0:?} (expected float32, float16 or bfloat16)")]
    Dtype(String),
    /// A range outside the tensor.
    #[error("element range {start}..{end} is outside a tensor of {numel} elements")]
    Range {
        /// First element.
        start: usize,
        /// One past the last element.
        end: usize,
        /// Elements in the tensor.
        numel: usize,
    },
}

/// The 4-bit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4: quantiles of the standard normal (QLoRA). The default for QLoRA.
    Nf4,
    /// FP4 (e2m1) in bitsandbytes' bit-pattern order. bitsandbytes' default when unspecified.
    Fp4,
}

impl QuantType {
    /// The name used in checkpoints: `"nf4"` or `"fp4"`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// `Nf4` when `nf4`, else `Fp4` (for the SIMD kernels' const parameter).
    #[cfg_attr(not(qlora_simd), allow(dead_code))]
    pub(crate) const fn of_nf4(nf4: bool) -> Self {
        if nf4 {
            QuantType::Nf4
        } else {
            QuantType::Fp4
        }
    }

    /// Parse `"nf4"` / `"fp4"`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Error::QuantType(other.to_string())),
        }
    }

    /// The 16 values codes dequantize to, as the CUDA kernels apply them.
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &codebook::NF4_TABLE,
            QuantType::Fp4 => &codebook::FP4_TABLE,
        }
    }

    /// The `quant_map` bitsandbytes stores in checkpoints (differs from [`table`](Self::table)
    /// only in FP4's code 8, +0.0 instead of −0.0).
    pub fn quant_map(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &codebook::NF4_TABLE,
            QuantType::Fp4 => &codebook::FP4_QUANT_MAP,
        }
    }

    /// The code chooser for normalized values.
    pub fn encoder(self) -> fn(f32) -> u8 {
        match self {
            QuantType::Nf4 => codebook::encode_nf4,
            QuantType::Fp4 => codebook::encode_fp4,
        }
    }

    /// Half the widest gap between adjacent code values: the worst-case error of one element
    /// relative to its block's absmax.
    pub fn max_half_gap(self) -> f32 {
        let mut v: Vec<f32> = self.table().to_vec();
        v.sort_by(f32::total_cmp);
        v.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0
    }

    /// The code of 0.0 in a block with non-zero absmax (the padding nibble of odd lengths).
    pub fn zero_code(self) -> u8 {
        (self.encoder())(0.0)
    }
}

/// Floating-point element types that can be quantized and that dequantization writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl Dtype {
    /// The name bitsandbytes writes into the quant-state JSON (`str(torch.dtype)` without the
    /// `torch.` prefix).
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
        }
    }

    /// Parse a torch dtype name (`float32`, `float16`, `bfloat16`).
    pub fn from_torch_name(s: &str) -> Result<Self, Error> {
        match s {
            "float32" => Ok(Dtype::F32),
            "float16" => Ok(Dtype::F16),
            "bfloat16" => Ok(Dtype::BF16),
            other => Err(Error::Dtype(other.to_string())),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
}

/// A float element type: conversion to f32 is exact; conversion from f32 rounds to nearest even.
pub trait Element:
    Copy + Send + Sync + PartialEq + std::fmt::Debug + bytemuck::Pod + 'static
{
    /// The dtype tag.
    const DTYPE: Dtype;
    /// Exact widening.
    fn to_f32(self) -> f32;
    /// Narrowing with round-to-nearest-even (NaN stays NaN).
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: Dtype = Dtype::BF16;
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Borrowed per-block absmax values, plain or double-quantized.
#[derive(Debug, Clone, Copy)]
pub enum AbsmaxView<'a> {
    /// One f32 per block.
    F32(&'a [f32]),
    /// Double-quantized: one code per block, one f32 per 256 blocks, a global offset.
    Double {
        /// Signed-dynamic-map codes, one per block.
        codes: &'a [u8],
        /// Nested scales, one per 256 blocks.
        nested_absmax: &'a [f32],
        /// The mean offset.
        offset: f32,
    },
}

impl AbsmaxView<'_> {
    /// Number of blocks described.
    pub fn len(&self) -> usize {
        match self {
            AbsmaxView::F32(a) => a.len(),
            AbsmaxView::Double { codes, .. } => codes.len(),
        }
    }

    /// True when no block is described.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The absmax of block `j` (reconstructed from double quantization where needed).
    ///
    /// # Panics
    /// If `j` is out of range.
    #[inline]
    pub fn get(&self, j: usize) -> f32 {
        match self {
            AbsmaxView::F32(a) => a[j],
            AbsmaxView::Double {
                codes,
                nested_absmax,
                offset,
            } => qlora_double_quant::reconstruct_absmax(
                codes[j],
                nested_absmax[j / NESTED_BLOCKSIZE],
                *offset,
            ),
        }
    }

    fn validate(&self, blocks: usize) -> Result<(), Error> {
        check_len("absmax", blocks, self.len())?;
        if let AbsmaxView::Double { nested_absmax, .. } = self {
            check_len(
                "nested_absmax",
                blocks.div_ceil(NESTED_BLOCKSIZE),
                nested_absmax.len(),
            )?;
        }
        Ok(())
    }
}

/// Check a 4-bit block size: a power of two from 32 to 4096.
pub fn check_blocksize(blocksize: usize) -> Result<(), Error> {
    if BLOCK_SIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::BlockSize(blocksize))
    }
}

pub(crate) fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), Error> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected,
            found,
        })
    }
}

/// Bytes of packed codes for `n` elements: `ceil(n / 2)`.
#[inline]
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of blocks for `n` elements.
#[inline]
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

pub(crate) fn validate_quantize(
    n: usize,
    blocksize: usize,
    packed: &[u8],
    absmax: &[f32],
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    check_len("packed", packed_len(n), packed.len())?;
    check_len("absmax", num_blocks(n, blocksize), absmax.len())
}

pub(crate) fn validate_dequantize(
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    blocksize: usize,
    n: usize,
    start: usize,
    len: usize,
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    check_len("packed", packed_len(n), packed.len())?;
    absmax.validate(num_blocks(n, blocksize))?;
    match start.checked_add(len) {
        Some(end) if end <= n => Ok(()),
        _ => Err(Error::Range {
            start,
            end: start.saturating_add(len),
            numel: n,
        }),
    }
}

/// Quantize `input` into caller-provided buffers (no allocation): `packed` holds
/// [`packed_len`]`(n)` bytes, `absmax` [`num_blocks`]`(n, blocksize)` values.
///
/// Runs the fastest [`Implementation`] of this CPU (AVX-512, AVX2, NEON, else the scalar oracle;
/// all produce the same bytes). Large inputs run on the rayon pool over ranges of whole blocks;
/// the result never depends on the threading.
pub fn quantize_into<T: Element>(
    quant_type: QuantType,
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<(), Error> {
    Implementation::active().quantize_into(quant_type, input, blocksize, packed, absmax)
}

/// Quantize `input` with double quantization into caller-provided buffers (no allocation):
/// [`quantize_into`] (`absmax` receives the f32 absmax values), then the 8-bit double
/// quantization of those values into `codes` (one per block) and `nested_absmax` (one per
/// [`NESTED_BLOCKSIZE`] blocks, rounded up); returns the offset. The same bytes as
/// [`quantize_into`] followed by [`double_quantize_absmax`], faster: the mean of the absmax
/// values (the offset) is gathered while each range's values are still in cache
/// ([`qlora_double_quant::MeanScan`]), instead of in a separate pass.
///
/// ```
/// use qlora_codec::{double_quantize_absmax, quantize_double_into, QuantType};
///
/// let x: Vec<f32> = (0..100_000).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
/// let blocks = x.len().div_ceil(64);
/// let (mut packed, mut absmax) = (vec![0u8; x.len() / 2], vec![0f32; blocks]);
/// let (mut codes, mut nested) = (vec![0u8; blocks], vec![0f32; blocks.div_ceil(256)]);
/// let offset = quantize_double_into(
///     QuantType::Nf4, &x, 64, &mut packed, &mut absmax, &mut codes, &mut nested,
/// )?;
/// let dq = double_quantize_absmax(&absmax);
/// assert_eq!((offset, codes, nested), (dq.offset, dq.codes, dq.nested_absmax));
/// # Ok::<(), qlora_codec::Error>(())
/// ```
///
/// # Errors
/// [`Error::BlockSize`] or [`Error::Length`] when a buffer's length does not fit `input`.
pub fn quantize_double_into<T: Element>(
    quant_type: QuantType,
    input: &[T],
    blocksize: usize,
    packed: &mut [u8],
    absmax: &mut [f32],
    codes: &mut [u8],
    nested_absmax: &mut [f32],
) -> Result<f32, Error> {
    Implementation::active().quantize_double_into(
        quant_type,
        input,
        blocksize,
        packed,
        absmax,
        codes,
        nested_absmax,
    )
}

/// Double-quantize per-block absmax values: [`DoubleQuantAbsmax::compress`] (bitsandbytes'
/// `compress_statistics`; the SIMD encoder of the 8-bit map, on the rayon pool when large). Pair
/// it with [`quantize_into`] to quantize into reused buffers with double quantization.
pub fn double_quantize_absmax(absmax: &[f32]) -> DoubleQuantAbsmax {
    DoubleQuantAbsmax::compress(absmax)
}

/// Dequantize a whole tensor into `out` (its length is the element count) without allocating.
///
/// Double-quantized absmax values are reconstructed block by block inside the kernel (no
/// separate pass). Runs the fastest [`Implementation`] of this CPU, on the rayon pool when large.
pub fn dequantize_into<T: Element>(
    quant_type: QuantType,
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    blocksize: usize,
    out: &mut [T],
) -> Result<(), Error> {
    Implementation::active().dequantize_into(quant_type, packed, absmax, blocksize, out)
}

/// Dequantize elements `start .. start + out.len()` of a tensor of `n` elements (for tile-by-tile
/// use inside a matrix product; `start` need not be block-aligned). Single-threaded.
pub fn dequantize_range_into<T: Element>(
    quant_type: QuantType,
    packed: &[u8],
    absmax: AbsmaxView<'_>,
    blocksize: usize,
    n: usize,
    start: usize,
    out: &mut [T],
) -> Result<(), Error> {
    Implementation::active()
        .dequantize_range_into(quant_type, packed, absmax, blocksize, n, start, out)
}
