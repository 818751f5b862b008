//! bitsandbytes' dynamic 8-bit maps and blockwise 8-bit quantization, bit-exact.
//!
//! # Should I use this crate?
//!
//! Use it directly when you need bitsandbytes' 8-bit *dynamic* code: to read or write the
//! double-quantized absmax of a 4-bit checkpoint (`weight.absmax` as `u8`,
//! `weight.nested_absmax`, `weight.nested_quant_map`, `nested_offset`), or to store optimizer
//! states the way `bnb.optim.AdamW8bit` does. For 4-bit weights as a whole use `qlora-codec`
//! (which builds on this crate) or the `qlora-nf4` facade.
//!
//! # What it implements
//!
//! * [`DynamicMap::signed`] and [`DynamicMap::unsigned`]: the 256-entry tables of
//!   `create_dynamic_map(signed=True|False)`, hard-coded as f32 bit patterns (torch's `linspace`
//!   rounds differently from a naive regeneration, so the tables are data, checked in tests).
//! * [`DynamicMap::encode`]: the CUDA kernels' binary search (`dQuantize<0>` / `quantize_2D`),
//!   which always returns the **nearest** code; an exact tie between two codes goes to the **even
//!   index**; values beyond the table clamp to index 0 / 255; NaN encodes as index 0.
//! * [`quantize_blockwise`] / [`dequantize_blockwise`]: per block, `absmax = max |x|` (NaN
//!   ignored, as CUDA's `fmaxf` reduction does; subnormals flushed), `code = encode(x * inv)` with
//!   `inv` the GPU's approximate reciprocal of the absmax ([`fastmath::rcp_approx_ftz`]: bitsandbytes'
//!   CUDA build uses `--use_fast_math`), `x' = f32(map[code] * absmax)`. Codes, absmax and
//!   dequantization equal bitsandbytes' CUDA output on an H200 bit for bit.
//! * [`fastmath`]: `rcp.approx.ftz.f32` from a table measured over every f32 mantissa, and
//!   flush-to-zero.
//! * [`DoubleQuantAbsmax`]: QLoRA's double quantization of the per-block absmax of a 4-bit tensor:
//!   `offset = mean(absmax)` (accumulated in f64, rounded to f32; bitsandbytes' is torch's GPU mean,
//!   which can be an ulp away — [`DoubleQuantAbsmax::compress_with_offset`] takes a stored one and
//!   then reproduces bitsandbytes' nested codes and absmax exactly), the centred values quantized
//!   with the signed map in blocks of [`NESTED_BLOCKSIZE`] = 256, reconstructed as
//!   `f32(f32(map[q] * nested_absmax[j / 256]) + offset)`.
//!   [`DoubleQuantAbsmax::compress_with_offset_into`] writes into reused buffers, and
//!   [`MeanScan`] gathers the offset chunk by chunk while the absmax values are computed (what
//!   `qlora_codec::quantize_double_into` does), with the same value as [`absmax_mean`].
//!
//! # Example
//!
//! ```
//! use qlora_double_quant::{DoubleQuantAbsmax, DynamicMap};
//!
//! // Per-block absmax values of a 4-bit weight (one f32 per 64 weights).
//! let absmax: Vec<f32> = (0..1000).map(|i| 0.02 + (i % 37) as f32 * 1e-3).collect();
//! let dq = DoubleQuantAbsmax::compress(&absmax);
//! assert_eq!(dq.codes.len(), 1000);            // 1 byte per block instead of 4
//! assert_eq!(dq.nested_absmax.len(), 4);       // one f32 per 256 blocks
//! let back = dq.decompress();
//! for (a, b) in absmax.iter().zip(&back) {
//!     assert!((a - b).abs() <= 2e-4);
//! }
//! // The code is the dynamic map of bitsandbytes.
//! assert_eq!(DynamicMap::signed().decode(255), 1.0);
//! ```
//!
//! # Numbers
//!
//! | storage of one absmax per `b` weights | bits per weight |
//! |---|---|
//! | f32 absmax | `32 / b` (0.5 at b = 64) |
//! | double quant | `8 / b + 32 / (256 b)` (0.127 at b = 64), plus 4 bytes of offset per tensor |
//!
//! See [`absmax_bits_per_param`].
//!
//! # Speed
//!
//! [`DynamicMap::encode`] is the kernels' binary search, kept as the oracle. [`Encoder`] gives the
//! same codes from a bucket table (one load, one compare per value), and its slice methods
//! ([`Encoder::encode_slice`], [`Encoder::encode_scaled`], [`Encoder::encode_divided`], the
//! per-block forms) and [`DynamicMap::decode_scaled`] run the best SIMD [`Implementation`] of the
//! CPU — AVX-512 (F + BW + DQ + VL, and VBMI where present), AVX2 (with FMA and F16C), NEON,
//! else scalar — picked once at first use; `QLORA_FORCE_SCALAR=1` in the environment forces the
//! scalar code. That choice is the whole workspace's: [`CpuFeatures`] detects the CPU once and
//! `qlora-codec` and `qlora-optim` re-export [`Implementation`] and run their own kernels for it,
//! so one process picks one implementation for every kernel. The AVX-512 encoder needs no
//! table load per value: the maps are decades of evenly spaced codes, so a per-decade straight
//! line (tables in registers, one FMA) gives the code, and the rare values within 2⁻¹² of a code
//! spacing of a decision threshold are redone with the exact table (an exhaustive test covers
//! every f32 of `[-2, 2]`). [`Implementation::update_blockwise`] runs a whole 8-bit optimizer
//! state update (dequantize, caller's update, re-quantize) with the tables set up once. Every
//! implementation is tested code for code against the oracle. Throughput on 64 Ki values in
//! cache, one core of a shared 2-core AMD Zen 4 (criterion,
//! `cargo bench -p qlora-benches --bench dynamic_map`; load average about 1.8 from other work,
//! so treat these as ratios):
//!
//! | operation | elements/s |
//! |---|---|
//! | `DynamicMap::encode` (binary search, data-dependent branches) | 19 M |
//! | `encode_scaled`, scalar table | 0.55 G |
//! | `encode_scaled`, AVX2 (`vpgatherdd`) | 1.8 G |
//! | `encode_scaled`, AVX-512 (segments) | 3.2 G |
//! | `encode_divided`, AVX-512 (segments on the reciprocal product) | 3.3 G |
//! | `decode_scaled`, scalar (also the AVX2 path) | 3.2 G |
//! | `decode_scaled`, AVX-512 VBMI (byte planes, `vpermt2b`) | 11.9 G |
//! | [`absmax_mean`], 1 Mi values (AVX2 scan, exact path) | 11 G |
//! | [`DoubleQuantAbsmax::compress`], 1 Mi absmax values, 2 threads | 2.2 G |
//!
//! [`absmax_mean`] sums on the rayon pool (from 512 Ki values) when the f64 sum is provably
//! independent of the order (in practice for the absmax of bf16/f16 weights), else left to right;
//! both give the same bits. The centring of [`DoubleQuantAbsmax::compress`] runs on 16 lanes with
//! AVX-512.
//!
//! # Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `testing` | proptest strategies (absmax values, optimizer moments) and reference oracles in the `testing` module, for downstream property tests |
// `unsafe` is confined to the SIMD kernels in `arch`; everything else is safe code.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[allow(unsafe_code)]
mod arch;
mod dispatch;
mod encoder;
pub mod fastmath;
mod maps_table;
mod simd;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

use rayon::prelude::*;

pub use dispatch::{CpuFeatures, Implementation};
pub use encoder::Encoder;
pub use maps_table::{SIGNED_DYNAMIC_MAP_BITS, UNSIGNED_DYNAMIC_MAP_BITS};

/// Block size of the nested (double) quantization of the absmax: bitsandbytes always uses 256.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Block size of the 8-bit blockwise optimizer states (bitsandbytes ≥ 0.44: `BLOCKSIZE_2STATE`).
pub const OPTIMIZER_BLOCKSIZE: usize = 256;

/// Blocks of at least this many elements are processed on the rayon pool; smaller inputs stay on
/// the calling thread.
const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A block size outside the supported set.
    #[error("block size {0} is not supported for 8-bit blockwise quantization (expected a power of two from 64 to 4096)")]
    BlockSize(usize),
    /// Buffers whose lengths do not fit together.
    #[error("length mismatch for {what}: expected {expected}, found {found}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// The length required by the input.
        expected: usize,
        /// The length given.
        found: usize,
    },
}

/// Mutable views of two 8-bit blockwise states of one tensor (codes and per-block absmax), as
/// [`Implementation::update_blockwise`] updates them: bitsandbytes' `state1` / `absmax1`
/// (first moment, usually the signed map) and `state2` / `absmax2` (second moment, unsigned).
#[derive(Debug)]
pub struct BlockwiseStatesMut<'a> {
    /// Codes of the first state, one per element.
    pub state1: &'a mut [u8],
    /// Absmax of the first state, one per block of [`OPTIMIZER_BLOCKSIZE`].
    pub absmax1: &'a mut [f32],
    /// Codes of the second state, as many as `state1`.
    pub state2: &'a mut [u8],
    /// Absmax of the second state, one per block.
    pub absmax2: &'a mut [f32],
}

/// Which of bitsandbytes' two dynamic maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapKind {
    /// `create_dynamic_map(signed=True)`: 127 negative values, 0.0, 128 positive values up to 1.0.
    Signed,
    /// `create_dynamic_map(signed=False)`: 0.0, then 255 positive values up to 1.0.
    Unsigned,
}

/// A 256-entry sorted code table of bitsandbytes' dynamic 8-bit quantization.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicMap {
    kind: MapKind,
    values: [f32; 256],
}

/// Byte `k` of the f32 bit pattern of every code's value, for each `k` (little-endian order):
/// the layout the AVX-512 VBMI decoder looks values up in (four 256-entry byte tables).
#[cfg(all(target_arch = "x86_64", qlora_simd))]
pub(crate) type BytePlanes = [[u8; 256]; 4];

#[cfg(all(target_arch = "x86_64", qlora_simd))]
const fn byte_planes(bits: &[u32; 256]) -> BytePlanes {
    let mut planes = [[0u8; 256]; 4];
    let mut i = 0;
    while i < 256 {
        let mut k = 0;
        while k < 4 {
            planes[k][i] = (bits[i] >> (8 * k)) as u8;
            k += 1;
        }
        i += 1;
    }
    planes
}

#[cfg(all(target_arch = "x86_64", qlora_simd))]
static SIGNED_PLANES: BytePlanes = byte_planes(&SIGNED_DYNAMIC_MAP_BITS);
#[cfg(all(target_arch = "x86_64", qlora_simd))]
static UNSIGNED_PLANES: BytePlanes = byte_planes(&UNSIGNED_DYNAMIC_MAP_BITS);

static SIGNED: DynamicMap = DynamicMap::from_bits(MapKind::Signed, &SIGNED_DYNAMIC_MAP_BITS);
static UNSIGNED: DynamicMap = DynamicMap::from_bits(MapKind::Unsigned, &UNSIGNED_DYNAMIC_MAP_BITS);

impl DynamicMap {
    const fn from_bits(kind: MapKind, bits: &[u32; 256]) -> Self {
        let mut values = [0.0f32; 256];
        let mut i = 0;
        while i < 256 {
            values[i] = f32::from_bits(bits[i]);
            i += 1;
        }
        DynamicMap { kind, values }
    }

    /// The signed map (`qmap1` of 8-bit optimizers, `nested_quant_map` of double quant).
    pub fn signed() -> &'static DynamicMap {
        &SIGNED
    }

    /// The unsigned map (`qmap2` of 8-bit optimizers).
    pub fn unsigned() -> &'static DynamicMap {
        &UNSIGNED
    }

    /// The map of the given kind.
    pub fn of(kind: MapKind) -> &'static DynamicMap {
        match kind {
            MapKind::Signed => Self::signed(),
            MapKind::Unsigned => Self::unsigned(),
        }
    }

    /// Which map this is.
    pub fn kind(&self) -> MapKind {
        self.kind
    }

    /// The 256 values, sorted ascending.
    pub fn values(&self) -> &[f32; 256] {
        &self.values
    }

    /// The fast exact encoder of this map ([`Encoder`]: the same codes as [`encode`](Self::encode),
    /// table-driven; built on first use).
    pub fn encoder(&self) -> &'static Encoder {
        match self.kind {
            MapKind::Signed => Encoder::signed(),
            MapKind::Unsigned => Encoder::unsigned(),
        }
    }

    /// The values as four byte planes (see [`BytePlanes`]).
    #[cfg(all(target_arch = "x86_64", qlora_simd))]
    pub(crate) fn byte_planes(&self) -> &'static BytePlanes {
        match self.kind {
            MapKind::Signed => &SIGNED_PLANES,
            MapKind::Unsigned => &UNSIGNED_PLANES,
        }
    }

    /// The value of a code.
    #[inline]
    pub fn decode(&self, code: u8) -> f32 {
        self.values[code as usize]
    }

    /// `out[i] = self.decode(codes[i]) * scale` (f32 product): the dequantization of one block
    /// with absmax `scale`. Runs the [`Implementation::active`] SIMD kernel (AVX-512: the map
    /// held in registers, looked up by permutes, and a multiply).
    ///
    /// # Panics
    /// If `out` is shorter than `codes`.
    #[inline]
    pub fn decode_scaled(&self, codes: &[u8], scale: f32, out: &mut [f32]) {
        assert!(
            out.len() >= codes.len(),
            "decode_scaled: output shorter than input"
        );
        Implementation::active().decode_scaled(self, codes, scale, out);
    }

    /// [`decode_scaled`](Self::decode_scaled) block by block: the codes of block `j` (elements
    /// `j·size .. (j+1)·size`, the last one possibly shorter) are scaled by `scales[j]`, in one
    /// call (the SIMD tables are set up once).
    ///
    /// ```
    /// use qlora_double_quant::DynamicMap;
    ///
    /// let map = DynamicMap::signed();
    /// let mut out = [0.0f32; 3];
    /// map.decode_blocks_scaled(&[255, 255, 127], 2, &[2.0, 3.0], &mut out);
    /// assert_eq!(out, [2.0, 2.0, 0.0]);
    /// ```
    ///
    /// # Panics
    /// If `size` is 0, `scales.len()` is not the number of blocks (`codes.len().div_ceil(size)`)
    /// or `out` is shorter than `codes`.
    pub fn decode_blocks_scaled(&self, codes: &[u8], size: usize, scales: &[f32], out: &mut [f32]) {
        Implementation::active().decode_blocks_scaled(self, codes, size, scales, out);
    }

    /// The code of a normalized value `xn` (normally in `[-1, 1]`), exactly as bitsandbytes' CUDA
    /// kernels choose it.
    ///
    /// This is the kernels' seven-step binary search followed by a midpoint test in f32
    /// (`dQuantize<0>`): the result is the nearest code; a value exactly halfway between two codes
    /// takes the even index (the search always ends on an even pivot); values beyond the ends
    /// clamp; NaN gives index 0.
    #[inline]
    pub fn encode(&self, xn: f32) -> u8 {
        let code = &self.values;
        let mut pivot: usize = 127;
        let mut lower_pivot: usize = 0;
        let mut upper_pivot: usize = 255;
        let mut lower = -1.0f32;
        let mut upper = 1.0f32;
        let mut step = 64;
        while step >= 1 {
            if xn > code[pivot] {
                lower_pivot = pivot;
                lower = code[pivot];
                pivot += step;
            } else {
                upper_pivot = pivot;
                upper = code[pivot];
                pivot -= step;
            }
            step /= 2;
        }
        if upper_pivot == 255 {
            upper = code[255];
        }
        if lower_pivot == 0 {
            lower = code[0];
        }
        let val = code[pivot];
        let q = if xn > val {
            if xn > (upper + val) * 0.5 {
                upper_pivot
            } else {
                pivot
            }
        } else if xn < (lower + val) * 0.5 {
            lower_pivot
        } else {
            pivot
        };
        q as u8
    }
}

/// Largest absolute value of a block as bitsandbytes' CUDA reduction computes it: NaN values are
/// skipped (`fmaxf`), an empty or all-zero block gives 0.0, an infinity gives `+inf`.
#[inline]
pub fn block_absmax(block: &[f32]) -> f32 {
    // `f32::max` ignores NaN operands exactly like C's fmaxf; start at 0 because the kernels' zero
    // padding always takes part in the reduction. A maximum of `|x|` (all zeros are +0.0) does not
    // depend on the order, so 16 independent accumulators (which vectorize) give the same value
    // as a left-to-right fold.
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let mut chunks = block.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = acc[j].max(c[j].abs());
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = a.max(x.abs());
    }
    acc.into_iter().fold(0.0f32, f32::max)
}

fn check_blocksize(blocksize: usize) -> Result<(), Error> {
    if blocksize.is_power_of_two() && (64..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::BlockSize(blocksize))
    }
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), Error> {
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

/// Number of blocks covering `n` elements.
#[inline]
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Quantize one block: returns its absmax and writes one code per element.
///
/// As bitsandbytes' CUDA kernel (`--use_fast_math`): `absmax = max(ftz(|x|))` (NaN ignored),
/// `inv = rcp.approx.ftz(absmax)` ([`fastmath::rcp_approx_ftz`]), `code = encode(ftz(ftz(x) · inv))`.
#[inline]
pub fn quantize_block(map: &DynamicMap, block: &[f32], codes: &mut [u8]) -> f32 {
    debug_assert_eq!(block.len(), codes.len());
    let absmax = fastmath::ftz_absmax(block_absmax(block));
    encode_block_gpu(map.encoder(), block, absmax, codes);
    absmax
}

/// Codes of a block with the CUDA kernels' fast math, given its (flushed) absmax: the slice
/// encoder on `x · rcp_approx_ftz(absmax)`, or element by element with every flush where the
/// absmax is so small that a subnormal input could matter ([`fastmath::is_tiny_absmax`]; for a
/// larger absmax a subnormal input's product is below 2⁻²⁶, where both maps give the code of 0).
#[inline]
fn encode_block_gpu(enc: &Encoder, block: &[f32], absmax: f32, codes: &mut [u8]) {
    let inv = fastmath::rcp_approx_ftz(absmax);
    if fastmath::is_tiny_absmax(absmax) {
        use fastmath::ftz;
        for (c, &x) in codes.iter_mut().zip(block) {
            *c = enc.encode(ftz(ftz(x) * inv));
        }
    } else {
        enc.encode_scaled(block, inv, codes);
    }
}

/// Blockwise 8-bit quantization (bitsandbytes `quantize_blockwise`, CUDA rule).
///
/// `codes` must hold `input.len()` bytes and `absmax` one f32 per block. `blocksize` is a power of
/// two from 64 to 4096. Large inputs run on the rayon pool; results do not depend on threading.
pub fn quantize_blockwise(
    map: &DynamicMap,
    input: &[f32],
    blocksize: usize,
    codes: &mut [u8],
    absmax: &mut [f32],
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    check_len("codes", input.len(), codes.len())?;
    check_len("absmax", num_blocks(input.len(), blocksize), absmax.len())?;
    let work = |((x, c), a): ((&[f32], &mut [u8]), &mut f32)| *a = quantize_block(map, x, c);
    if input.len() >= PARALLEL_THRESHOLD {
        input
            .par_chunks(blocksize)
            .zip(codes.par_chunks_mut(blocksize))
            .zip(absmax.par_iter_mut())
            .for_each(work);
    } else {
        input
            .chunks(blocksize)
            .zip(codes.chunks_mut(blocksize))
            .zip(absmax.iter_mut())
            .for_each(work);
    }
    Ok(())
}

/// Blockwise 8-bit dequantization: `out[i] = f32(map[codes[i]] * absmax[i / blocksize])`.
pub fn dequantize_blockwise(
    map: &DynamicMap,
    codes: &[u8],
    absmax: &[f32],
    blocksize: usize,
    out: &mut [f32],
) -> Result<(), Error> {
    check_blocksize(blocksize)?;
    check_len("out", codes.len(), out.len())?;
    check_len("absmax", num_blocks(codes.len(), blocksize), absmax.len())?;
    map.decode_blocks_scaled(codes, blocksize, absmax, out);
    Ok(())
}

/// The double-quantized form of the per-block absmax of a 4-bit tensor (QLoRA's "double
/// quantization", bitsandbytes' `compress_statistics=True`).
///
/// Stored in a checkpoint as `weight.absmax` (u8, these [`codes`](Self::codes)),
/// `weight.nested_absmax` (f32), `weight.nested_quant_map` (the signed map) and the JSON field
/// `nested_offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuantAbsmax {
    /// One signed-map code per 4-bit block.
    pub codes: Vec<u8>,
    /// One f32 scale per [`NESTED_BLOCKSIZE`] codes.
    pub nested_absmax: Vec<f32>,
    /// The mean of the original absmax values, subtracted before quantization.
    pub offset: f32,
}

/// The offset bitsandbytes subtracts before double quantization: the mean of the absmax values,
/// accumulated in f64 and rounded to f32. (bitsandbytes uses a float32 torch reduction whose
/// summation order is implementation-defined; the last bit may differ, and a reader always uses
/// the stored value.)
///
/// The value is that of a left-to-right f64 accumulation. When every partial sum of the input is
/// provably exact in f64 (checked in the same pass: all values finite, and `ceil(log2 n)` plus the
/// largest exponent at most 29 above the smallest exponent plus the fewest trailing zero bits of
/// any fraction — true for the absmax of bf16/f16 weights, whose values carry 8/11 significant
/// bits, unless the block maxima span more than about 20 octaves) any order gives that sum, so it
/// is summed in 8 lanes on the rayon pool; otherwise sequentially.
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    (sum_f64(absmax) / absmax.len() as f64) as f32
}

/// What one pass over a chunk learns: the sum in 8 f64 lanes, the largest and the smallest
/// non-zero `|x|` bit patterns, and the OR of all fraction bits.
#[derive(Clone, Copy)]
pub(crate) struct SumScan {
    sum: f64,
    max_abs_bits: u32,
    /// Smallest `|x|` bit pattern minus one, wrapping (so a zero counts as `u32::MAX`).
    min_abs_bits_m1: u32,
    fraction_or: u32,
}

impl SumScan {
    fn merge(self, o: SumScan) -> SumScan {
        SumScan {
            sum: self.sum + o.sum,
            max_abs_bits: self.max_abs_bits.max(o.max_abs_bits),
            min_abs_bits_m1: self.min_abs_bits_m1.min(o.min_abs_bits_m1),
            fraction_or: self.fraction_or | o.fraction_or,
        }
    }

    /// A lower bound of the position (`biased exponent + trailing zeros of the significand`) of
    /// the lowest set bit of every non-zero value: the smallest exponent plus the fewest trailing
    /// zeros of any fraction (23 when every fraction is zero: powers of two).
    fn low_bit_bound(&self) -> u32 {
        let e_min = (self.min_abs_bits_m1.wrapping_add(1) >> 23).max(1);
        e_min + (self.fraction_or & 0x007f_ffff).trailing_zeros().min(23)
    }
}

const SUM_LANES: usize = 8;

/// [`SumScan`] of a chunk with the active [`Implementation`] (the same integer and f64 operations,
/// compiled for AVX2 where the CPU has it: the portable build has no unsigned 32-bit min/max).
fn sum_scan(x: &[f32]) -> SumScan {
    match Implementation::active() {
        #[cfg(all(target_arch = "x86_64", qlora_simd))]
        Implementation::Avx512 | Implementation::Avx2 => arch::x86_64::avx2::Kernel::new()
            .map_or_else(|| sum_scan_portable(x), |k| k.sum_scan(x)),
        _ => sum_scan_portable(x),
    }
}

/// [`sum_scan`] in portable code; inlined into the AVX2 build.
#[inline(always)]
pub(crate) fn sum_scan_portable(x: &[f32]) -> SumScan {
    let mut acc = [0.0f64; SUM_LANES];
    let mut max_bits = [0u32; SUM_LANES];
    let mut min_m1 = [u32::MAX; SUM_LANES];
    let mut or = [0u32; SUM_LANES];
    let mut lanes = x.chunks_exact(SUM_LANES);
    for c in &mut lanes {
        let c: &[f32; SUM_LANES] = c.try_into().expect("chunks_exact");
        for j in 0..SUM_LANES {
            let a = c[j].to_bits() & 0x7fff_ffff;
            acc[j] += c[j] as f64;
            max_bits[j] = max_bits[j].max(a);
            min_m1[j] = min_m1[j].min(a.wrapping_sub(1));
            or[j] |= a;
        }
    }
    for (j, &v) in lanes.remainder().iter().enumerate() {
        let a = v.to_bits() & 0x7fff_ffff;
        acc[j] += v as f64;
        max_bits[j] = max_bits[j].max(a);
        min_m1[j] = min_m1[j].min(a.wrapping_sub(1));
        or[j] |= a;
    }
    SumScan {
        sum: acc.iter().sum(),
        max_abs_bits: max_bits.into_iter().max().unwrap_or(0),
        min_abs_bits_m1: min_m1.into_iter().min().unwrap_or(u32::MAX),
        fraction_or: or.into_iter().fold(0, |a, b| a | b),
    }
}

/// [`absmax_mean`] gathered piece by piece: scan consecutive chunks of the absmax values while
/// they are at hand (in cache, right after they were computed), [`merge`](Self::merge) the
/// scans in any grouping, then [`mean`](Self::mean) gives exactly [`absmax_mean`] of the whole
/// (it re-reads the values only in the rare case where the sum's order matters, see there).
///
/// ```
/// # use qlora_double_quant::{absmax_mean, MeanScan};
/// let absmax: Vec<f32> = (0..5000).map(|i| 0.02 + (i % 61) as f32 * 1e-3).collect();
/// let (a, b) = absmax.split_at(1234);
/// let scan = MeanScan::of(a).merge(MeanScan::of(b));
/// assert_eq!(scan.mean(&absmax)?.to_bits(), absmax_mean(&absmax).to_bits());
/// # Ok::<(), qlora_double_quant::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct MeanScan {
    scan: SumScan,
    len: usize,
}

impl std::fmt::Debug for MeanScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeanScan")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl MeanScan {
    /// The scan of one chunk (vectorized: about 10 G values/s on one core with AVX2).
    pub fn of(chunk: &[f32]) -> Self {
        MeanScan {
            scan: sum_scan(chunk),
            len: chunk.len(),
        }
    }

    /// The scan of both chunks together (any order and grouping gives the same [`mean`](Self::mean)).
    pub fn merge(self, other: MeanScan) -> MeanScan {
        MeanScan {
            scan: self.scan.merge(other.scan),
            len: self.len + other.len,
        }
    }

    /// [`absmax_mean`]`(absmax)`, where `absmax` is the whole input whose chunks were scanned
    /// (read again only when the summation order matters).
    ///
    /// # Errors
    /// [`Error::Length`] if `absmax.len()` is not the number of values scanned.
    pub fn mean(self, absmax: &[f32]) -> Result<f32, Error> {
        check_len("absmax (scanned values)", self.len, absmax.len())?;
        if absmax.is_empty() {
            return Ok(0.0);
        }
        Ok((sum_from_scan(self.scan, absmax) / absmax.len() as f64) as f32)
    }
}

/// `x.iter().map(|&v| v as f64)` summed left to right, exactly that value (see [`absmax_mean`]).
fn sum_f64(x: &[f32]) -> f64 {
    // One core scans about 10 G values/s (AVX2); split only inputs worth the pool's overhead.
    const CHUNK: usize = 1 << 18;
    let scan = if x.len() >= 2 * CHUNK {
        x.par_chunks(CHUNK)
            .map(sum_scan)
            .reduce_with(SumScan::merge)
            .expect("non-empty")
    } else {
        sum_scan(x)
    };
    sum_from_scan(scan, x)
}

/// The left-to-right f64 sum of `x`, given the [`SumScan`] of all of `x` (merged in any order):
/// the scan's sum when it is provably exact, else a sequential pass.
fn sum_from_scan(scan: SumScan, x: &[f32]) -> f64 {
    // Every value is a multiple of 2^(low - 150) (`low` = the lowest set bit's position bound) and
    // below 2^(e_max - 126); every partial sum (of any subset) is below n · 2^(e_max - 126) ≤
    // 2^(53 + low - 150) when the test holds, hence exact in f64, and the sum does not depend on
    // the order.
    let e_max = scan.max_abs_bits >> 23;
    let log_n = x.len().next_power_of_two().trailing_zeros();
    // All-zero input goes the sequential way too (its sum's sign is that of the accumulation).
    let finite_nonzero = scan.max_abs_bits != 0 && scan.max_abs_bits < 0x7f80_0000;
    if finite_nonzero && log_n + e_max <= scan.low_bit_bound() + 29 {
        scan.sum
    } else {
        x.iter().map(|&a| a as f64).sum()
    }
}

/// Nested blocks per parallel task of [`DoubleQuantAbsmax::compress_with_offset`] (16 Ki absmax
/// values, about 10 µs of work).
const COMPRESS_BLOCKS_PER_TASK: usize = 64;

/// Lanes of the centring / absmax pass (independent max accumulators vectorize).
const CENTER_LANES: usize = 16;

/// `x[i] - offset` into `centered`, and the largest `|x[i] - offset|` with NaN ignored — the same
/// value as [`block_absmax`] of the centred block (a maximum does not depend on the order, and
/// `abs` makes every zero `+0.0`).
#[inline]
pub(crate) fn center_and_absmax(x: &[f32], offset: f32, centered: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; CENTER_LANES];
    let mut xs = x.chunks_exact(CENTER_LANES);
    let mut cs = centered.chunks_exact_mut(CENTER_LANES);
    for (x, c) in (&mut xs).zip(&mut cs) {
        for j in 0..CENTER_LANES {
            c[j] = x[j] - offset;
            acc[j] = acc[j].max(c[j].abs());
        }
    }
    for (j, (&x, c)) in xs.remainder().iter().zip(cs.into_remainder()).enumerate() {
        *c = x - offset;
        acc[j] = acc[j].max(c.abs());
    }
    acc.into_iter().fold(0.0f32, f32::max)
}

/// [`center_and_absmax`] with the AVX-512 kernel where it runs (the same values).
#[inline]
fn center(x: &[f32], offset: f32, centered: &mut [f32]) -> f32 {
    match Implementation::active() {
        #[cfg(all(target_arch = "x86_64", qlora_simd))]
        Implementation::Avx512 => match arch::x86_64::avx512::Kernel::new() {
            Some(k) => k.center_and_absmax(x, offset, centered),
            None => center_and_absmax(x, offset, centered),
        },
        _ => center_and_absmax(x, offset, centered),
    }
}

/// Double-quantize whole nested blocks: centre each block in a stack buffer while finding its
/// absmax, then encode `centred · (1/absmax)` with the signed map (the slice encoder).
fn compress_blocks(
    enc: &Encoder,
    offset: f32,
    absmax: &[f32],
    codes: &mut [u8],
    nested: &mut [f32],
) {
    let mut centered = [0f32; NESTED_BLOCKSIZE];
    for ((a, c), n) in absmax
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
        .zip(nested.iter_mut())
    {
        let centered = &mut centered[..a.len()];
        let m = fastmath::ftz_absmax(center(a, offset, centered));
        encode_block_gpu(enc, centered, m, c);
        *n = m;
    }
}

/// [`compress_blocks`] over whole buffers of validated lengths, on the rayon pool when large.
fn compress_blocks_parallel(offset: f32, absmax: &[f32], codes: &mut [u8], nested: &mut [f32]) {
    let enc = Encoder::signed();
    let per_task = COMPRESS_BLOCKS_PER_TASK * NESTED_BLOCKSIZE;
    if absmax.len() <= per_task {
        compress_blocks(enc, offset, absmax, codes, nested);
    } else {
        absmax
            .par_chunks(per_task)
            .zip(codes.par_chunks_mut(per_task))
            .zip(nested.par_chunks_mut(COMPRESS_BLOCKS_PER_TASK))
            .for_each(|((a, c), n)| compress_blocks(enc, offset, a, c, n));
    }
}

impl DoubleQuantAbsmax {
    /// Double-quantize absmax values with the offset bitsandbytes would choose ([`absmax_mean`]).
    pub fn compress(absmax: &[f32]) -> Self {
        Self::compress_with_offset(absmax, absmax_mean(absmax))
    }

    /// Double-quantize absmax values around a given offset (for reproducing a stored checkpoint
    /// exactly).
    pub fn compress_with_offset(absmax: &[f32], offset: f32) -> Self {
        let mut codes = vec![0u8; absmax.len()];
        let mut nested_absmax = vec![0f32; num_blocks(absmax.len(), NESTED_BLOCKSIZE)];
        compress_blocks_parallel(offset, absmax, &mut codes, &mut nested_absmax);
        DoubleQuantAbsmax {
            codes,
            nested_absmax,
            offset,
        }
    }

    /// [`compress_with_offset`](Self::compress_with_offset) into caller-provided buffers (no
    /// allocation, for reused buffers): `codes` holds one byte per absmax value, `nested_absmax`
    /// one f32 per [`NESTED_BLOCKSIZE`] of them (rounded up). The same values.
    ///
    /// ```
    /// # use qlora_double_quant::{absmax_mean, DoubleQuantAbsmax};
    /// let absmax: Vec<f32> = (0..1000).map(|i| 0.01 + (i % 37) as f32 * 1e-3).collect();
    /// let offset = absmax_mean(&absmax);
    /// let (mut codes, mut nested) = (vec![0u8; 1000], vec![0f32; 4]);
    /// DoubleQuantAbsmax::compress_with_offset_into(&absmax, offset, &mut codes, &mut nested)?;
    /// let whole = DoubleQuantAbsmax::compress(&absmax);
    /// assert_eq!((codes, nested), (whole.codes, whole.nested_absmax));
    /// # Ok::<(), qlora_double_quant::Error>(())
    /// ```
    pub fn compress_with_offset_into(
        absmax: &[f32],
        offset: f32,
        codes: &mut [u8],
        nested_absmax: &mut [f32],
    ) -> Result<(), Error> {
        check_len("codes", absmax.len(), codes.len())?;
        check_len(
            "nested_absmax",
            num_blocks(absmax.len(), NESTED_BLOCKSIZE),
            nested_absmax.len(),
        )?;
        compress_blocks_parallel(offset, absmax, codes, nested_absmax);
        Ok(())
    }

    /// Number of absmax values (= 4-bit blocks).
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// True when there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// Check that the nested scales match the number of codes.
    pub fn validate(&self) -> Result<(), Error> {
        check_len(
            "nested_absmax",
            num_blocks(self.codes.len(), NESTED_BLOCKSIZE),
            self.nested_absmax.len(),
        )
    }

    /// The absmax of block `j`: `f32(f32(map[q] * nested_absmax[j / 256]) + offset)`.
    ///
    /// # Panics
    /// If `j` is out of range.
    #[inline]
    pub fn absmax(&self, j: usize) -> f32 {
        reconstruct_absmax(
            self.codes[j],
            self.nested_absmax[j / NESTED_BLOCKSIZE],
            self.offset,
        )
    }

    /// Reconstruct every absmax value into `out`.
    ///
    /// # Panics
    /// If `out.len() != self.len()` or the nested scales are too few.
    pub fn decompress_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.codes.len(), "absmax output length");
        for ((o, c), &s) in out
            .chunks_mut(NESTED_BLOCKSIZE)
            .zip(self.codes.chunks(NESTED_BLOCKSIZE))
            .zip(&self.nested_absmax)
        {
            for (o, &c) in o.iter_mut().zip(c) {
                *o = reconstruct_absmax(c, s, self.offset);
            }
        }
    }

    /// Reconstruct every absmax value.
    pub fn decompress(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.codes.len()];
        self.decompress_into(&mut out);
        out
    }

    /// Bytes this representation occupies: one byte per block, four per nested block, four for
    /// the offset.
    pub fn nbytes(&self) -> usize {
        self.codes.len() + 4 * self.nested_absmax.len() + 4
    }
}

/// One double-quantized absmax value: `f32(f32(signed_map[code] * nested) + offset)`, two
/// roundings exactly as bitsandbytes' Python path does (no fused multiply-add).
#[inline]
pub fn reconstruct_absmax(code: u8, nested: f32, offset: f32) -> f32 {
    // The product is bitsandbytes' fast-math `dequantize_blockwise` kernel (flush to zero, CUDA's
    // NaN); the sum is torch's IEEE addition.
    let scaled = fastmath::mul_ftz(DynamicMap::signed().decode(code), nested);
    scaled + offset
}

/// Bits per parameter spent on absmax storage for 4-bit block size `blocksize`, with or without
/// double quantization (per-tensor constants such as the offset and the maps are not counted).
///
/// ```
/// # use qlora_double_quant::absmax_bits_per_param;
/// assert_eq!(absmax_bits_per_param(64, false), 0.5);
/// assert!((absmax_bits_per_param(64, true) - 0.126953125).abs() < 1e-12);
/// ```
pub fn absmax_bits_per_param(blocksize: usize, double_quant: bool) -> f64 {
    let b = blocksize as f64;
    if double_quant {
        8.0 / b + 32.0 / (b * NESTED_BLOCKSIZE as f64)
    } else {
        32.0 / b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's rule restated without its binary search: count the f32 midpoints
    /// `(v[i] + v[i+1]) * 0.5` strictly below `xn`; a value exactly on a midpoint takes the even
    /// one of the two neighbouring indices. (Comparing with f32-rounded midpoints is what makes
    /// this differ from exact nearest in f64 for a handful of values.)
    fn nearest_even(map: &DynamicMap, xn: f32) -> u8 {
        if xn.is_nan() {
            return 0;
        }
        let v = map.values();
        let mids: Vec<f32> = (0..255).map(|i| (v[i] + v[i + 1]) * 0.5).collect();
        let k = mids.iter().filter(|&&m| xn > m).count();
        if k < 255 && xn == mids[k] && k % 2 == 1 {
            return (k + 1) as u8;
        }
        k as u8
    }

    #[test]
    fn maps_are_sorted_and_anchored() {
        for map in [DynamicMap::signed(), DynamicMap::unsigned()] {
            let v = map.values();
            assert!(
                v.windows(2).all(|w| w[0] < w[1]),
                "{:?} not strictly sorted",
                map.kind()
            );
            assert_eq!(v[255], 1.0);
        }
        let s = DynamicMap::signed().values();
        assert_eq!(s[0], -0.992_968_75);
        assert_eq!(s[127], 0.0);
        assert_eq!(DynamicMap::unsigned().values()[0], 0.0);
    }

    #[test]
    fn encode_is_nearest_with_even_ties() {
        for map in [DynamicMap::signed(), DynamicMap::unsigned()] {
            let v = map.values();
            // Every code, every exact f32 midpoint, and points just around them.
            for i in 0..255 {
                let mid = (v[i] + v[i + 1]) * 0.5;
                for x in [v[i], mid, mid.next_down(), mid.next_up(), v[i + 1]] {
                    assert_eq!(map.encode(x), nearest_even(map, x), "x = {x:e}");
                }
            }
            let mut s = 0x1234_5678u32;
            for _ in 0..200_000 {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let x = (s as f32 / u32::MAX as f32) * 2.2 - 1.1;
                let x = x * 10f32.powi(-((s % 7) as i32));
                assert_eq!(map.encode(x), nearest_even(map, x), "x = {x:e}");
            }
            assert_eq!(map.encode(f32::NAN), 0);
            assert_eq!(map.encode(2.0), 255);
            assert_eq!(map.encode(-2.0), 0);
        }
    }

    #[test]
    fn nested_roundtrip_error_is_small() {
        let absmax: Vec<f32> = (0..5000)
            .map(|i| 0.01 + ((i * 37) % 101) as f32 * 1e-4)
            .collect();
        let dq = DoubleQuantAbsmax::compress(&absmax);
        dq.validate().unwrap();
        assert_eq!(dq.nested_absmax.len(), 20);
        let back = dq.decompress();
        for (j, (a, b)) in absmax.iter().zip(&back).enumerate() {
            // Worst-case gap of the signed map near ±1 is 0.0140625; half of it times the
            // nested scale bounds the error.
            let bound = dq.nested_absmax[j / 256] * 0.0140625 * 0.5 + 1e-7;
            assert!((a - b).abs() <= bound, "block {j}: {a} vs {b}");
            assert_eq!(*b, dq.absmax(j));
        }
    }

    #[test]
    fn block_absmax_is_the_fold() {
        let mut s = 0x2545_f491u32;
        for len in (0..70).chain([255, 256, 1000]) {
            let x: Vec<f32> = (0..len)
                .map(|i| {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    match i % 13 {
                        3 => f32::NAN,
                        5 => -0.0,
                        _ => (s % 100_000) as f32 * 0.01 - 500.0,
                    }
                })
                .collect();
            let fold = x.iter().fold(0.0f32, |m, &v| m.max(v.abs()));
            assert_eq!(block_absmax(&x).to_bits(), fold.to_bits(), "len {len}");
        }
        assert_eq!(block_absmax(&[f32::NAN, -0.0]).to_bits(), 0);
        assert_eq!(block_absmax(&[1.0, f32::NEG_INFINITY]), f32::INFINITY);
    }

    #[test]
    fn all_zero_block_follows_cuda() {
        let mut codes = [9u8; 300];
        let mut absmax = [1f32; 2];
        let mut x = [0f32; 300];
        x[290] = 0.5;
        quantize_blockwise(DynamicMap::signed(), &x, 256, &mut codes, &mut absmax).unwrap();
        assert_eq!(absmax[0], 0.0);
        // 0 * (1/0) = NaN → index 0.
        assert!(codes[..256].iter().all(|&c| c == 0));
        assert_eq!(codes[290], 255);
        assert_eq!(codes[291], 127);
    }

    /// The definition `absmax_mean` keeps: a left-to-right f64 accumulation.
    fn sequential_sum(x: &[f32]) -> f64 {
        x.iter().map(|&a| a as f64).sum()
    }

    fn check_sum(x: &[f32]) {
        let (fast, slow) = (sum_f64(x), sequential_sum(x));
        assert_eq!(
            fast.to_bits(),
            slow.to_bits(),
            "n = {}: {fast} vs {slow}",
            x.len()
        );
        let mean = if x.is_empty() {
            0.0
        } else {
            (slow / x.len() as f64) as f32
        };
        if !x.is_empty() {
            assert_eq!(absmax_mean(x).to_bits(), mean.to_bits());
        }
        // Scanned in chunks (as quantization's tasks do), merged from the last chunk back.
        for chunk in [1usize, 7, 1000, x.len() / 3 + 1] {
            let scan = x
                .chunks(chunk)
                .rev()
                .map(MeanScan::of)
                .fold(MeanScan::of(&[]), |a, b| a.merge(b));
            assert_eq!(
                scan.mean(x).unwrap().to_bits(),
                mean.to_bits(),
                "n = {} chunk {chunk}",
                x.len()
            );
        }
    }

    #[test]
    fn mean_scan_rejects_another_input() {
        let x = [1.0f32, 2.0, 3.0];
        let e = MeanScan::of(&x[..2]).mean(&x).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Length {
                    expected: 2,
                    found: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn mean_is_the_sequential_f64_sum() {
        let mut s = 0x9e37_79b9u32;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        for n in [
            0usize,
            1,
            7,
            8,
            9,
            1000,
            (1 << 17) + 3,
            1 << 20,
            (1 << 21) + 5,
        ] {
            // bf16-exact absmax values (8 significant bits): the parallel exact path.
            let bf: Vec<f32> = (0..n)
                .map(|_| f32::from_bits(0x3c00_0000 + ((next() % 0x0200_0000) & 0xffff_0000)))
                .collect();
            let lo = bf.len().next_power_of_two().trailing_zeros();
            let scan = sum_scan(&bf);
            let portable = sum_scan_portable(&bf);
            assert_eq!(scan.sum.to_bits(), portable.sum.to_bits());
            assert_eq!(
                (scan.max_abs_bits, scan.min_abs_bits_m1, scan.fraction_or),
                (
                    portable.max_abs_bits,
                    portable.min_abs_bits_m1,
                    portable.fraction_or
                )
            );
            if n > 0 {
                // The exactness test holds, so the fast path is the one checked here.
                assert!(
                    lo + (scan.max_abs_bits >> 23) <= scan.low_bit_bound() + 29,
                    "n = {n}"
                );
            }
            check_sum(&bf);
            // Arbitrary f32 values over many decades, both signs: mostly the sequential path.
            let wide: Vec<f32> = (0..n)
                .map(|_| f32::from_bits(next() & 0xbfff_ffff) * 1e-3)
                .collect();
            check_sum(&wide);
            // Full-precision values of one octave: exact only for small n.
            let octave: Vec<f32> = (0..n)
                .map(|_| f32::from_bits(0x3f80_0000 | (next() & 0x007f_ffff)))
                .collect();
            check_sum(&octave);
            // Cancelling pairs, zeros and subnormals.
            let mut mixed: Vec<f32> = bf.iter().map(|&v| -v).chain(bf.iter().copied()).collect();
            mixed.extend([0.0, -0.0, f32::from_bits(1), -f32::from_bits(3)]);
            check_sum(&mixed);
        }
        // Full-precision values whose exponents span `spread` octaves: around the exactness
        // bound (spread 19 at n = 1000), on both sides of it.
        for spread in 10..=40u32 {
            for n in [1000usize, 5000] {
                let x: Vec<f32> = (0..n)
                    .map(|_| {
                        let e = 100 + next() % (spread + 1);
                        f32::from_bits(e << 23 | (next() & 0x007f_ffff))
                    })
                    .collect();
                check_sum(&x);
            }
            // Top-heavy: 7 in 8 values just below 2^(e_top - 126), the rest `spread` octaves
            // lower with the lowest fraction bit set, so the sum needs exactly `54 - 29 + spread`
            // bits: on the exact path up to spread 19, one bit short of exact at 20.
            let e_top = 120u32;
            let x: Vec<f32> = (0..1024)
                .map(|i| {
                    if i % 8 != 3 {
                        f32::from_bits(e_top << 23 | 0x0070_0000 | (next() & 0x000f_ffff))
                    } else {
                        f32::from_bits((e_top - spread) << 23 | (next() & 0x007f_ffff) | 1)
                    }
                })
                .collect();
            check_sum(&x);
        }
        for special in [
            vec![-0.0f32],
            vec![-0.0; 300_000],
            vec![0.0, -0.0],
            vec![1.0, f32::INFINITY, 2.0],
            vec![f32::NAN; 9],
            vec![f32::MAX; 20],
            vec![1e-45; 20],
            vec![1.0, -1.0],
            vec![16_777_216.0, 1.0, 1.0, 1.0],
        ] {
            check_sum(&special);
        }
    }

    proptest::proptest! {
        #[test]
        fn mean_is_the_sequential_f64_sum_for_any_input(
            x in proptest::collection::vec(proptest::num::f32::ANY, 0..300),
            half in proptest::collection::vec(0u16..0x7f80, 0..3000),
        ) {
            check_sum(&x);
            // bf16 bit patterns (non-negative, finite): the exact path.
            let bf: Vec<f32> = half.iter().map(|&h| f32::from_bits((h as u32) << 16)).collect();
            check_sum(&bf);
        }
    }

    /// Double quantization restated on the oracle `DynamicMap::encode` (the transliterated CUDA
    /// binary search) with a left-to-right f64 mean: (offset, codes, nested absmax).
    fn oracle(a: &[f32]) -> (f32, Vec<u8>, Vec<f32>) {
        let offset = if a.is_empty() {
            0.0
        } else {
            (a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64) as f32
        };
        let map = DynamicMap::signed();
        let (mut codes, mut nested) = (Vec::new(), Vec::new());
        for block in a.chunks(NESTED_BLOCKSIZE) {
            let c: Vec<f32> = block.iter().map(|&v| v - offset).collect();
            let m = fastmath::ftz(c.iter().fold(0.0f32, |m, &x| m.max(x.abs())));
            let inv = fastmath::rcp_approx_ftz(m);
            let enc = |x: f32| map.encode(fastmath::ftz(fastmath::ftz(x) * inv));
            codes.extend(c.iter().map(|&x| enc(x)));
            nested.push(m);
        }
        (offset, codes, nested)
    }

    #[test]
    fn compress_matches_the_oracle_on_many_lengths() {
        let mut s = 0x1234_5678u32;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        for len in [
            0usize,
            1,
            2,
            255,
            256,
            257,
            1000,
            64 * 256 - 1,
            64 * 256 + 300,
            100_000,
            300_001,
        ] {
            let mut a: Vec<f32> = (0..len).map(|_| (next() % 10_000) as f32 / 997.0).collect();
            if len % 2 == 1 {
                // bf16-exact values (what bf16 weights give): the mean's exact parallel path.
                for v in a.iter_mut() {
                    *v = f32::from_bits(v.to_bits() & 0xffff_0000);
                }
            }
            for (i, v) in a.iter_mut().enumerate() {
                match i % 501 {
                    7 => *v = 0.0,
                    11 => *v = f32::INFINITY,
                    13 => *v = 1.0e30,
                    17 => *v = f32::from_bits(1),
                    _ => {}
                }
            }
            if len > 300 {
                a[..300].fill(0.25); // a constant block
            }
            let fast = DoubleQuantAbsmax::compress(&a);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (offset, codes, nested) = oracle(&a);
            assert_eq!(fast.offset.to_bits(), offset.to_bits(), "oracle, len {len}");
            assert_eq!(fast.codes, codes, "oracle, len {len}");
            assert_eq!(
                bits(&fast.nested_absmax),
                bits(&nested),
                "oracle, len {len}"
            );
        }
    }

    #[test]
    fn compress_equals_the_binary_search() {
        // DoubleQuantAbsmax::compress runs the fast encoder; restate it on `DynamicMap::encode`.
        let absmax: Vec<f32> = (0..70_000)
            .map(|i| match i % 997 {
                3 => 0.0,
                5 => f32::from_bits(1),
                _ => 0.003 + ((i * 7919) % 1013) as f32 * 1.7e-5,
            })
            .collect();
        let dq = DoubleQuantAbsmax::compress(&absmax);
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        assert_eq!(dq.offset.to_bits(), offset.to_bits());
        for (j, block) in absmax.chunks(NESTED_BLOCKSIZE).enumerate() {
            let c: Vec<f32> = block.iter().map(|&a| a - offset).collect();
            let m = c.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
            assert_eq!(dq.nested_absmax[j].to_bits(), m.to_bits());
            for (i, &x) in c.iter().enumerate() {
                let code = DynamicMap::signed().encode(x * fastmath::rcp_approx_ftz(m));
                assert_eq!(dq.codes[j * NESTED_BLOCKSIZE + i], code, "block {j} [{i}]");
            }
        }
    }

    #[test]
    fn bad_blocksize_is_an_error() {
        let mut c = [0u8; 4];
        let mut a = [0f32; 1];
        assert_eq!(
            quantize_blockwise(DynamicMap::signed(), &[0.0; 4], 100, &mut c, &mut a),
            Err(Error::BlockSize(100))
        );
    }
}
