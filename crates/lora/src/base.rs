//! The frozen base weight of a LoRA layer — dense (f32/bf16/f16) or 4-bit — and the tiled matrix
//! products that read it without ever materializing a 4-bit weight whole.

use crate::error::{check_len, Error, Result};
use crate::matmul;
use half::{bf16, f16};
use qlora_codec::{Dtype, Element, QuantizedTensor};
use rayon::prelude::*;

/// f32 elements in one dequantized tile (2 MiB): the only weight-sized scratch a 4-bit forward or
/// backward holds.
pub const TILE_ELEMS: usize = 1 << 19;

/// Token counts up to this use the fused matrix-vector path (no tile buffer at all; for a 4-bit
/// weight the codec's [`QuantizedTensor::gemv`], four tokens per pass over the codes on AVX-512).
pub const GEMV_MAX_TOKENS: usize = 4;

/// Dense weight storage.
#[derive(Debug, Clone, PartialEq)]
pub enum DenseData {
    /// float32.
    F32(Vec<f32>),
    /// bfloat16.
    Bf16(Vec<bf16>),
    /// float16.
    F16(Vec<f16>),
}

impl DenseData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            DenseData::F32(v) => v.len(),
            DenseData::Bf16(v) => v.len(),
            DenseData::F16(v) => v.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The dtype.
    pub fn dtype(&self) -> Dtype {
        match self {
            DenseData::F32(_) => Dtype::F32,
            DenseData::Bf16(_) => Dtype::BF16,
            DenseData::F16(_) => Dtype::F16,
        }
    }

    /// Every element widened to f32 (exact).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.read_into(0, &mut out);
        out
    }

    /// Round f32 values to `dtype` (round to nearest even).
    pub fn from_f32(data: &[f32], dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => DenseData::F32(data.to_vec()),
            Dtype::BF16 => DenseData::Bf16(data.iter().map(|&v| bf16::from_f32(v)).collect()),
            Dtype::F16 => DenseData::F16(data.iter().map(|&v| f16::from_f32(v)).collect()),
        }
    }

    /// Widen elements `start..start + out.len()` into `out`.
    pub(crate) fn read_into(&self, start: usize, out: &mut [f32]) {
        fn widen<T: Element>(src: &[T], out: &mut [f32]) {
            out.par_chunks_mut(1 << 14)
                .zip(src.par_chunks(1 << 14))
                .for_each(|(o, s)| o.iter_mut().zip(s).for_each(|(o, s)| *o = s.to_f32()));
        }
        let end = start + out.len();
        match self {
            DenseData::F32(v) => out.copy_from_slice(&v[start..end]),
            DenseData::Bf16(v) => widen(&v[start..end], out),
            DenseData::F16(v) => widen(&v[start..end], out),
        }
    }
}

/// The frozen base weight of a linear layer.
///
/// The logical weight is `W: [out, in]` (PyTorch `nn.Linear` layout). A dense weight may be stored
/// transposed, `[in, out]`, as HF `Conv1D` does (`fan_in_fan_out`); a 4-bit weight is always
/// `[out, in]` (bitsandbytes' `Linear4bit`).
#[derive(Debug, Clone, PartialEq)]
pub enum BaseWeight {
    /// A dense weight.
    Dense {
        /// Row-major elements of the stored matrix.
        data: DenseData,
        /// Output features.
        out_features: usize,
        /// Input features.
        in_features: usize,
        /// Stored as `[in, out]` instead of `[out, in]`.
        fan_in_fan_out: bool,
    },
    /// A 4-bit (NF4/FP4) weight of shape `[out, in]`, dequantized tile by tile when used.
    Quantized(QuantizedTensor),
}

impl BaseWeight {
    /// A dense `[out, in]` weight, checking the length.
    pub fn dense(data: DenseData, out_features: usize, in_features: usize) -> Result<Self> {
        check_len("base weight", &[out_features, in_features], data.len())?;
        Ok(BaseWeight::Dense {
            data,
            out_features,
            in_features,
            fan_in_fan_out: false,
        })
    }

    /// A dense weight stored `[in, out]` (HF `Conv1D`, `fan_in_fan_out = true`).
    pub fn dense_fan_in_fan_out(
        data: DenseData,
        out_features: usize,
        in_features: usize,
    ) -> Result<Self> {
        check_len("base weight", &[in_features, out_features], data.len())?;
        Ok(BaseWeight::Dense {
            data,
            out_features,
            in_features,
            fan_in_fan_out: true,
        })
    }

    /// A 4-bit weight; its shape must be 2-D `[out, in]`.
    pub fn quantized(q: QuantizedTensor) -> Result<Self> {
        if q.shape().len() != 2 {
            return Err(Error::Shape {
                what: "4-bit base weight (must be 2-D [out, in])".into(),
                expected: vec![0, 0],
                found: q.shape().to_vec(),
            });
        }
        Ok(BaseWeight::Quantized(q))
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            BaseWeight::Dense { out_features, .. } => *out_features,
            BaseWeight::Quantized(q) => q.shape()[0],
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match self {
            BaseWeight::Dense { in_features, .. } => *in_features,
            BaseWeight::Quantized(q) => q.shape()[1],
        }
    }

    /// True for a dense weight stored `[in, out]`.
    pub fn fan_in_fan_out(&self) -> bool {
        matches!(
            self,
            BaseWeight::Dense {
                fan_in_fan_out: true,
                ..
            }
        )
    }

    /// The dtype of the weight's values (for 4-bit: the dtype it dequantizes to).
    pub fn dtype(&self) -> Dtype {
        match self {
            BaseWeight::Dense { data, .. } => data.dtype(),
            BaseWeight::Quantized(q) => q.dtype(),
        }
    }

    /// (rows, cols) of the stored matrix.
    pub(crate) fn stored_dims(&self) -> (usize, usize) {
        if self.fan_in_fan_out() {
            (self.in_features(), self.out_features())
        } else {
            (self.out_features(), self.in_features())
        }
    }

    /// The logical `[out, in]` weight as f32 (values as the base dtype holds them). Materializes
    /// the whole matrix: for tests, merges and initialization, not for forward/backward.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let (rows, cols) = self.stored_dims();
        let mut stored = vec![0.0f32; rows * cols];
        self.read_rows(0, rows, &mut stored)?;
        if self.fan_in_fan_out() {
            Ok(matmul::transpose(&stored, rows, cols))
        } else {
            Ok(stored)
        }
    }

    /// Stored rows `r0..r1` as f32 into `out` (values rounded to the base dtype, as bitsandbytes'
    /// `dequantize_4bit` returns them).
    pub(crate) fn read_rows(&self, r0: usize, r1: usize, out: &mut [f32]) -> Result<()> {
        let (_, cols) = self.stored_dims();
        debug_assert_eq!(out.len(), (r1 - r0) * cols);
        match self {
            BaseWeight::Dense { data, .. } => {
                data.read_into(r0 * cols, out);
                Ok(())
            }
            BaseWeight::Quantized(q) => {
                // Each task rounds its own chunk while it is still in cache.
                let chunk = (1usize << 14).div_ceil(cols).max(1) * cols;
                out.par_chunks_mut(chunk)
                    .enumerate()
                    .try_for_each(|(i, o)| {
                        q.dequantize_range_into::<f32>(r0 * cols + i * chunk, o)?;
                        round_to_dtype(o, q.dtype());
                        Ok::<(), qlora_codec::Error>(())
                    })?;
                Ok(())
            }
        }
    }

    /// Call `f(r0, r1, tile)` for consecutive tiles of stored rows, `tile` holding rows `r0..r1`
    /// as f32. A dense f32 weight is lent without copying.
    pub(crate) fn for_each_tile(
        &self,
        mut f: impl FnMut(usize, usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let (rows, cols) = self.stored_dims();
        if let BaseWeight::Dense {
            data: DenseData::F32(v),
            ..
        } = self
        {
            return f(0, rows, v);
        }
        let tile_rows = (TILE_ELEMS / cols.max(1)).clamp(1, rows.max(1));
        let mut buf = vec![0.0f32; tile_rows * cols];
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + tile_rows).min(rows);
            let tile = &mut buf[..(r1 - r0) * cols];
            self.read_rows(r0, r1, tile)?;
            f(r0, r1, tile)?;
            r0 = r1;
        }
        Ok(())
    }

    /// `Y[n, out] = X[n, in] · Wᵀ` for a caller (a framework's custom op): the same tiled
    /// product (fused matrix–vector kernel for `n ≤ GEMV_MAX_TOKENS`) the layer's forward runs,
    /// after checking the lengths of `x` and `y`. The weight is never dequantized whole.
    pub fn matmul_x_wt(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        check_len("input x", &[n, self.in_features()], x.len())?;
        check_len("output y", &[n, self.out_features()], y.len())?;
        self.x_wt(x, n, y, false)
    }

    /// `dX[n, in] = G[n, out] · W` for a caller (the input gradient of `X·Wᵀ`), tile by tile,
    /// after checking the lengths of `g` and `dx`.
    pub fn matmul_g_w(&self, g: &[f32], n: usize, dx: &mut [f32]) -> Result<()> {
        check_len("grad_y", &[n, self.out_features()], g.len())?;
        check_len("grad_x", &[n, self.in_features()], dx.len())?;
        self.g_w(g, n, dx, false)
    }

    /// `Y[n, out] (+)= X[n, in] · Wᵀ`, tile by tile. For `n ≤ GEMV_MAX_TOKENS` and an `[out, in]`
    /// layout this is a fused matrix-vector product that decodes 4-bit codes straight into the
    /// dot product.
    pub(crate) fn x_wt(&self, x: &[f32], n: usize, y: &mut [f32], accumulate: bool) -> Result<()> {
        let (out_f, in_f) = (self.out_features(), self.in_features());
        if !accumulate {
            y.iter_mut().for_each(|v| *v = 0.0);
        }
        if n <= GEMV_MAX_TOKENS && !self.fan_in_fan_out() {
            return self.gemv(x, n, y);
        }
        if self.fan_in_fan_out() {
            // Stored [in, out]: Y += X[:, k0..k1] · Ws[k0..k1, :].
            self.for_each_tile(|k0, k1, tile| {
                matmul::gemm(
                    y,
                    (n, out_f, out_f),
                    matmul::strided(&x[k0..], n, k1 - k0, in_f),
                    matmul::strided(tile, k1 - k0, out_f, out_f),
                    1.0,
                );
                Ok(())
            })
        } else {
            // Stored [out, in]: Y[:, r0..r1] += X · tileᵀ.
            self.for_each_tile(|r0, r1, tile| {
                matmul::gemm_into_cols(
                    y,
                    out_f,
                    r0,
                    r1,
                    n,
                    matmul::strided(x, n, in_f, in_f),
                    matmul::strided(tile, r1 - r0, in_f, in_f).transpose(),
                    1.0,
                );
                Ok(())
            })
        }
    }

    /// `dX[n, in] (+)= G[n, out] · W`, tile by tile.
    pub(crate) fn g_w(&self, g: &[f32], n: usize, dx: &mut [f32], accumulate: bool) -> Result<()> {
        let (out_f, in_f) = (self.out_features(), self.in_features());
        if !accumulate {
            dx.iter_mut().for_each(|v| *v = 0.0);
        }
        if self.fan_in_fan_out() {
            // Stored [in, out]: dX[:, k0..k1] += G · tileᵀ.
            self.for_each_tile(|k0, k1, tile| {
                matmul::gemm_into_cols(
                    dx,
                    in_f,
                    k0,
                    k1,
                    n,
                    matmul::strided(g, n, out_f, out_f),
                    matmul::strided(tile, k1 - k0, out_f, out_f).transpose(),
                    1.0,
                );
                Ok(())
            })
        } else {
            // Stored [out, in]: dX += G[:, r0..r1] · tile.
            self.for_each_tile(|r0, r1, tile| {
                matmul::gemm(
                    dx,
                    (n, in_f, in_f),
                    matmul::strided(&g[r0..], n, r1 - r0, out_f),
                    matmul::strided(tile, r1 - r0, in_f, in_f),
                    1.0,
                );
                Ok(())
            })
        }
    }

    /// Fused matrix-vector products for a few tokens over an `[out, in]` layout: `y += X·Wᵀ`.
    ///
    /// A 4-bit weight goes through the codec's fused kernel ([`QuantizedTensor::gemv`]): codes
    /// are looked up in a per-block table of dequantized values and multiplied into `x` straight
    /// from the packed nibbles, each output summed in [`qlora_codec::gemv`]'s fixed order (so the
    /// result is bit for bit `gemv::dot` of the dequantized row with `x`, on every CPU).
    fn gemv(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<()> {
        let (out_f, in_f) = (self.out_features(), self.in_features());
        match self {
            BaseWeight::Dense { data, .. } => {
                // yt[j, t] = W_j · x_t, ROWS output rows per task.
                let mut yt = vec![0.0f32; out_f * n];
                const ROWS: usize = 16;
                yt.par_chunks_mut(ROWS * n).enumerate().for_each(|(c, yc)| {
                    let j0 = c * ROWS;
                    for (jj, yrow) in yc.chunks_mut(n).enumerate() {
                        let j = j0 + jj;
                        let w = j * in_f..(j + 1) * in_f;
                        for (t, yv) in yrow.iter_mut().enumerate() {
                            let xt = &x[t * in_f..(t + 1) * in_f];
                            *yv = match data {
                                DenseData::F32(v) => dot_f32(&v[w.clone()], xt),
                                DenseData::Bf16(v) => dot_bf16(&v[w.clone()], xt),
                                DenseData::F16(v) => dot_f16(&v[w.clone()], xt),
                            };
                        }
                    }
                });
                for t in 0..n {
                    for j in 0..out_f {
                        y[t * out_f + j] += yt[j * n + t];
                    }
                }
            }
            BaseWeight::Quantized(q) => {
                let mut yq = vec![0.0f32; n * out_f];
                q.gemv(x, n, &mut yq)?;
                y.iter_mut().zip(&yq).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    }
}

/// Round f32 values to what `dtype` can hold (identity for f32).
pub(crate) fn round_to_dtype(v: &mut [f32], dtype: Dtype) {
    match dtype {
        Dtype::F32 => {}
        Dtype::BF16 => v.iter_mut().for_each(|x| *x = round_bf16(*x)),
        Dtype::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
    }
}

/// f32 → bf16 → f32 with round-to-nearest-even, branch-free so loops over it vectorize
/// (NaN stays NaN; equals `half::bf16::from_f32(x).to_f32()`).
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    let is_nan = (bits & 0x7fff_ffff) > 0x7f80_0000;
    f32::from_bits(if is_nan { bits | 0x0040_0000 } else { rounded })
}

const LANES: usize = 16;

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, ar) = a.split_at(a.len() / LANES * LANES);
    let (bc, br) = b.split_at(ac.len());
    for (ca, cb) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(br).map(|(x, y)| x * y).sum::<f32>()
}

fn dot_bf16(a: &[bf16], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, ar) = a.split_at(a.len() / LANES * LANES);
    let (bc, br) = b.split_at(ac.len());
    for (ca, cb) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += f32::from_bits((ca[l].to_bits() as u32) << 16) * cb[l];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(br).map(|(x, y)| x.to_f32() * y).sum::<f32>()
}

fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, ar) = a.split_at(a.len() / LANES * LANES);
    let (bc, br) = b.split_at(ac.len());
    let mut tmp = [0.0f32; LANES];
    for (ca, cb) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for l in 0..LANES {
            tmp[l] = ca[l].to_f32();
        }
        for l in 0..LANES {
            acc[l] += tmp[l] * cb[l];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(br).map(|(x, y)| x.to_f32() * y).sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_codec::{gemv, QuantType, QuantizeOptions};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// The fused 4-bit path of `x_wt` (n ≤ GEMV_MAX_TOKENS) equals dequantize-then-dot in the
    /// codec's documented summation order, bit for bit: odd and tail shapes, block sizes, NF4 and
    /// FP4, f32/bf16/f16 weights, double quant on and off, and `accumulate` adding to `y`.
    #[test]
    fn fused_4bit_gemv_equals_dequantize_then_dot() {
        let mut seed = 1;
        for (out_f, in_f) in [(7usize, 64usize), (5, 100), (9, 33), (3, 4096), (300, 256)] {
            for bs in [32usize, 64, 256] {
                for qt in [QuantType::Nf4, QuantType::Fp4] {
                    for double_quant in [false, true] {
                        seed += 1;
                        let w: Vec<f32> =
                            values(out_f * in_f, seed).iter().map(|v| v * 0.1).collect();
                        let options = QuantizeOptions {
                            quant_type: qt,
                            blocksize: bs,
                            double_quant,
                        };
                        let shape = [out_f, in_f];
                        let q = match seed % 3 {
                            0 => QuantizedTensor::quantize(&w, &shape, options),
                            1 => {
                                let v: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
                                QuantizedTensor::quantize(&v, &shape, options)
                            }
                            _ => {
                                let v: Vec<f16> = w.iter().map(|&x| f16::from_f32(x)).collect();
                                QuantizedTensor::quantize(&v, &shape, options)
                            }
                        }
                        .unwrap();
                        let base = BaseWeight::quantized(q).unwrap();
                        // Dequantized in the weight's dtype (bitsandbytes' dequantize_4bit).
                        let deq = base.to_f32().unwrap();
                        for n in 1..=GEMV_MAX_TOKENS {
                            let x = values(n * in_f, seed + 100);
                            let mut y = vec![f32::NAN; n * out_f];
                            base.x_wt(&x, n, &mut y, false).unwrap();
                            let prior = values(n * out_f, seed + 200);
                            let mut acc = prior.clone();
                            base.x_wt(&x, n, &mut acc, true).unwrap();
                            for t in 0..n {
                                for j in 0..out_f {
                                    let want = gemv::dot(
                                        &deq[j * in_f..(j + 1) * in_f],
                                        &x[t * in_f..(t + 1) * in_f],
                                    )
                                    .unwrap();
                                    let i = t * out_f + j;
                                    assert_eq!(
                                        y[i].to_bits(),
                                        (0.0 + want).to_bits(),
                                        "{out_f}x{in_f} bs {bs} {qt:?} dq {double_quant} n {n} [{t},{j}]"
                                    );
                                    assert_eq!(acc[i].to_bits(), (prior[i] + want).to_bits());
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fast_bf16_rounding_equals_half() {
        let mut s = 0x1234_5678u32;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = f32::from_bits(s);
            let want = bf16::from_f32(x).to_f32();
            let got = round_bf16(x);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{x:e}"
            );
        }
        for x in [
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + f32::EPSILON,
        ] {
            assert_eq!(
                round_bf16(x).to_bits(),
                bf16::from_f32(x).to_f32().to_bits(),
                "{x:e}"
            );
        }
    }

    #[test]
    fn public_products_check_lengths_and_equal_the_dense_product() {
        let w: Vec<f32> = (0..6).map(|i| i as f32).collect(); // [[0,1,2],[3,4,5]]
        let base = BaseWeight::dense(DenseData::F32(w), 2, 3).unwrap();
        let mut y = vec![0.0; 2];
        base.matmul_x_wt(&[1.0, 1.0, 1.0], 1, &mut y).unwrap();
        assert_eq!(y, [3.0, 12.0]);
        let mut dx = vec![0.0; 3];
        base.matmul_g_w(&[1.0, 2.0], 1, &mut dx).unwrap();
        assert_eq!(dx, [6.0, 9.0, 12.0]);
        assert!(matches!(
            base.matmul_x_wt(&[1.0; 4], 1, &mut y),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            base.matmul_g_w(&[1.0; 2], 1, &mut [0.0; 2]),
            Err(Error::Shape { .. })
        ));
    }
}
