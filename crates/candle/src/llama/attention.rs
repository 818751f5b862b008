//! Causal self-attention from the projections to the heads' concatenated output as one CPU op,
//! with its backward.
//!
//! The composed form (split the heads: reshape, transpose, copy; rotary embeddings: two
//! multiplies, two narrows, a negation, a concatenation and an add, for queries and keys; repeat
//! the key/value heads; `q·kᵀ`; the masked softmax; `p·v`; merge the heads) makes about thirty
//! nodes per layer, each of whose gradients candle accumulates into a freshly zeroed tensor.
//! Here one op takes `q: [b, t, heads·d]`, `k, v: [b, t, kv_heads·d]` and returns
//! `[b, t, heads·d]`: per batch row and key/value head (in parallel), the keys are rotated once,
//! and for each query head of the group the rotated queries are multiplied by the keys, the
//! causal softmax ([`super::softmax`]) is taken, and the probabilities multiply the values —
//! every product in blocks of 32 query rows that stop at the block's last causal column, so about
//! half of the masked upper triangle is never computed (both ways). The
//! probabilities are kept for the backward pass (`b·heads·t²` floats, as the composed form
//! keeps); the rotated queries and keys are recomputed there.
//!
//! The values are the composed form's up to the order of float sums in the products (the rotary
//! embedding and the softmax are the same operations in the same order). CPU, f32 and f64.

use std::any::Any;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use faer::linalg::matmul::matmul;
use faer::traits::ComplexField;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::softmax::{backward_into, forward_into, Float};
use crate::cpu_op::contiguous;

/// The float types of the op: [`Float`] for the element-wise parts, faer's for the products.
pub(crate) trait Scalar: Float + ComplexField + 'static {}
impl Scalar for f32 {}
impl Scalar for f64 {}

/// `softmax(scale · rot(q)·rot(k)ᵀ + causal mask) · v` per head; see the module docs.
pub(crate) struct FusedAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    window: usize,
    /// Rotary tables `[t, head_dim]`, as the model computed them in its dtype.
    cos: Vec<f64>,
    sin: Vec<f64>,
    /// The probabilities `[b, heads, t, t]` from the forward pass (a `Vec<T>`).
    probs: Mutex<Option<Box<dyn Any + Send>>>,
}

impl FusedAttention {
    /// The op for `heads` query heads over `kv_heads` key/value heads of `head_dim`, rotary
    /// tables `cos`, `sin` (`[t, head_dim]`) and a sliding `window` (`usize::MAX`: none).
    pub(crate) fn new(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        window: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Self> {
        let table = |x: &Tensor| x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
        Ok(FusedAttention {
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            window,
            cos: table(cos)?,
            sin: table(sin)?,
            probs: Mutex::new(None),
        })
    }

    /// `(b, t)` from the three layouts, checked against the head counts and the rotary tables.
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<(usize, usize)> {
        let d = self.head_dim;
        let &[b, t, qw] = lq.dims() else {
            candle_core::bail!(
                "fused attention: q must be [b, t, heads·d], found {:?}",
                lq.dims()
            );
        };
        if qw != self.heads * d
            || lk.dims() != [b, t, self.kv_heads * d]
            || lv.dims() != lk.dims()
            || self.heads % self.kv_heads.max(1) != 0
            || self.cos.len() != t * d
            || self.sin.len() != t * d
        {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not fit {} heads over {} key/value \
                 heads of {d} and rotary tables for {} positions",
                lq.dims(),
                lk.dims(),
                lv.dims(),
                self.heads,
                self.kv_heads,
                self.cos.len() / d.max(1)
            );
        }
        Ok((b, t))
    }
}

/// `dst (=|+=) lhs · rhs`, on the calling thread.
fn product<T: Scalar>(dst: MatMut<'_, T>, lhs: MatRef<'_, T>, rhs: MatRef<'_, T>, add: bool) {
    let accum = if add { Accum::Add } else { Accum::Replace };
    matmul(dst, accum, lhs, rhs, T::from_f64(1.0), Par::Seq);
}

/// A row-major `[r, c]` slice as a mutable matrix.
fn rows_mut<T: Scalar>(s: &mut [T], r: usize, c: usize) -> MatMut<'_, T> {
    // A row-major [r, c] is the transpose of a column-major [c, r].
    MatMut::from_column_major_slice_mut(s, c, r).transpose_mut()
}

/// Query rows per block: the products of a block of rows stop at its last causal column, so
/// the masked upper triangle of `q·kᵀ`, `p·v` and their gradients is (mostly) not computed.
const BLOCK: usize = 32;

/// The row blocks `(i0, rows)` of `t` positions; block `i0` sees the columns `0 .. i0 + rows`.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(BLOCK).map(move |i0| (i0, BLOCK.min(t - i0)))
}

fn rows<T: Scalar>(s: &[T], r: usize, c: usize) -> MatRef<'_, T> {
    MatRef::from_row_major_slice(s, r, c)
}

/// The geometry of one call: what a task needs to find its head's rows.
#[derive(Clone, Copy)]
struct Geometry {
    t: usize,
    d: usize,
    heads: usize,
    kv_heads: usize,
}

impl Geometry {
    /// Head `h` of batch row `b` of a `[b, t, n_heads·d]` tensor, copied to `[t, d]`, rotated by
    /// the rotary tables when given (`x·cos + rotate_half(x)·sin`, rotate_half(x) = [−x₂, x₁]).
    fn head<T: Scalar>(
        &self,
        x: &[T],
        n_heads: usize,
        b: usize,
        h: usize,
        rot: Option<(&[T], &[T])>,
    ) -> Vec<T> {
        let (t, d) = (self.t, self.d);
        let half = d / 2;
        let mut out = vec![T::ZERO; t * d];
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            let x = &x[(b * t + i) * n_heads * d + h * d..][..d];
            match rot {
                None => o.copy_from_slice(x),
                Some((cos, sin)) => {
                    let (c, s) = (&cos[i * d..][..d], &sin[i * d..][..d]);
                    let (o1, o2) = o.split_at_mut(half);
                    let (x1, x2) = x.split_at(half);
                    for j in 0..half {
                        o1[j] = Float::add(x1[j] * c[j], Float::neg(x2[j]) * s[j]);
                        o2[j] = Float::add(x2[j] * c[half + j], x1[j] * s[half + j]);
                    }
                }
            }
        }
        out
    }

    /// The input gradient of the rotation from the gradient `g: [t, d]` of its output:
    /// `dx_j = g_j·cos_j + g_{j+h}·sin_{j+h}`, `dx_{j+h} = g_{j+h}·cos_{j+h} − g_j·sin_j`.
    fn unrotate<T: Scalar>(&self, g: &mut [T], cos: &[T], sin: &[T]) {
        let d = self.d;
        let half = d / 2;
        for (i, row) in g.chunks_exact_mut(d).enumerate() {
            let (c, s) = (&cos[i * d..][..d], &sin[i * d..][..d]);
            let (g1, g2) = row.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (g1[j], g2[j]);
                g1[j] = Float::add(a * c[j], b * s[half + j]);
                g2[j] = Float::add(b * c[half + j], Float::neg(a * s[j]));
            }
        }
    }

    /// Write `[t, d]` head blocks into `[b, t, n_heads·d]`: `blocks[(b·groups + g)]` holds heads
    /// `g·per .. (g+1)·per` of batch row `b`, one `[t, d]` block after another.
    fn scatter<T: Scalar>(&self, blocks: &[Vec<T>], n_heads: usize, per: usize) -> Vec<T> {
        let (t, d) = (self.t, self.d);
        let groups = n_heads / per;
        let mut out = vec![T::ZERO; blocks.len() / groups * t * n_heads * d];
        for (task, block) in blocks.iter().enumerate() {
            let (b, g) = (task / groups, task % groups);
            for j in 0..per {
                let h = g * per + j;
                for i in 0..t {
                    out[(b * t + i) * n_heads * d + h * d..][..d]
                        .copy_from_slice(&block[(j * t + i) * d..][..d]);
                }
            }
        }
        out
    }
}

impl FusedAttention {
    fn geometry(&self, t: usize) -> Geometry {
        Geometry {
            t,
            d: self.head_dim,
            heads: self.heads,
            kv_heads: self.kv_heads,
        }
    }

    /// The rotary tables in `T`.
    fn tables<T: Scalar>(&self) -> (Vec<T>, Vec<T>) {
        let conv = |x: &[f64]| x.iter().map(|&v| T::from_f64(v)).collect();
        (conv(&self.cos), conv(&self.sin))
    }

    fn forward<T: Scalar>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        b: usize,
        t: usize,
    ) -> (Vec<T>, Vec<T>) {
        let geo = self.geometry(t);
        let (d, rep) = (self.head_dim, self.heads / self.kv_heads);
        let scale = T::from_f64(self.scale);
        let (cos, sin) = self.tables::<T>();
        let rot = Some((&cos[..], &sin[..]));
        let mut probs = vec![T::ZERO; b * self.heads * t * t];
        let outs: Vec<Vec<T>> = probs
            .par_chunks_mut(rep * t * t)
            .enumerate()
            .map(|(task, p)| {
                let (bi, g) = (task / self.kv_heads, task % self.kv_heads);
                let kr = geo.head(k, geo.kv_heads, bi, g, rot);
                let vg = geo.head(v, geo.kv_heads, bi, g, None);
                let mut out = vec![T::ZERO; rep * t * d];
                let mut s = vec![T::ZERO; t * t];
                for (j, (p, o)) in p
                    .chunks_exact_mut(t * t)
                    .zip(out.chunks_exact_mut(t * d))
                    .enumerate()
                {
                    let qr = geo.head(q, geo.heads, bi, g * rep + j, rot);
                    let (qm, km, vm) = (rows(&qr, t, d), rows(&kr, t, d), rows(&vg, t, d));
                    // S[I, ..i1] = Qr[I]·Kr[..i1]ᵀ per row block I (the rest is masked).
                    for (i0, n) in blocks(t) {
                        let i1 = i0 + n;
                        let dst = rows_mut(&mut s, t, t).submatrix_mut(i0, 0, n, i1);
                        product(dst, qm.subrows(i0, n), km.subrows(0, i1).transpose(), false);
                    }
                    forward_into(&s, p, t, scale, self.window);
                    // O[I] = P[I, ..i1]·V[..i1].
                    for (i0, n) in blocks(t) {
                        let i1 = i0 + n;
                        let pm = rows(p, t, t).submatrix(i0, 0, n, i1);
                        product(
                            rows_mut(o, t, d).subrows_mut(i0, n),
                            pm,
                            vm.subrows(0, i1),
                            false,
                        );
                    }
                }
                out
            })
            .collect();
        (geo.scatter(&outs, self.heads, rep), probs)
    }

    /// `(dq, dk, dv)` from the output gradient `go: [b, t, heads·d]`.
    #[allow(clippy::type_complexity)]
    fn backward<T: Scalar>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        go: &[T],
        probs: &[T],
        t: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let geo = self.geometry(t);
        let (d, rep) = (self.head_dim, self.heads / self.kv_heads);
        let (cos, sin) = self.tables::<T>();
        let rot = Some((&cos[..], &sin[..]));
        let scale = T::from_f64(self.scale);
        let grads: Vec<(Vec<T>, Vec<T>, Vec<T>)> = probs
            .par_chunks(rep * t * t)
            .enumerate()
            .map(|(task, p)| {
                let (bi, g) = (task / self.kv_heads, task % self.kv_heads);
                let kr = geo.head(k, geo.kv_heads, bi, g, rot);
                let vg = geo.head(v, geo.kv_heads, bi, g, None);
                let mut dq = vec![T::ZERO; rep * t * d];
                let mut dk = vec![T::ZERO; t * d];
                let mut dv = vec![T::ZERO; t * d];
                let mut dp = vec![T::ZERO; t * t];
                let mut ds = vec![T::ZERO; t * t];
                for (j, (p, dq)) in p
                    .chunks_exact(t * t)
                    .zip(dq.chunks_exact_mut(t * d))
                    .enumerate()
                {
                    let h = g * rep + j;
                    let qr = geo.head(q, geo.heads, bi, h, rot);
                    let gh = geo.head(go, geo.heads, bi, h, None);
                    // dV += Pᵀ·dO, dP = dO·Vᵀ, dS = softmax backward, dQr = dS·Kr, dKr += dSᵀ·Qr,
                    // each per row block I up to its last causal column i1 (dP stays 0 beyond).
                    let (qm, km, vm) = (rows(&qr, t, d), rows(&kr, t, d), rows(&vg, t, d));
                    let gm = rows(&gh, t, d);
                    for (i0, n) in blocks(t) {
                        let i1 = i0 + n;
                        let pm = rows(p, t, t).submatrix(i0, 0, n, i1);
                        product(
                            rows_mut(&mut dv, t, d).subrows_mut(0, i1),
                            pm.transpose(),
                            gm.subrows(i0, n),
                            true,
                        );
                        let dst = rows_mut(&mut dp, t, t).submatrix_mut(i0, 0, n, i1);
                        product(dst, gm.subrows(i0, n), vm.subrows(0, i1).transpose(), false);
                    }
                    backward_into(p, &dp, &mut ds, t, scale);
                    for (i0, n) in blocks(t) {
                        let i1 = i0 + n;
                        let sm = rows(&ds, t, t).submatrix(i0, 0, n, i1);
                        product(
                            rows_mut(dq, t, d).subrows_mut(i0, n),
                            sm,
                            km.subrows(0, i1),
                            false,
                        );
                        product(
                            rows_mut(&mut dk, t, d).subrows_mut(0, i1),
                            sm.transpose(),
                            qm.subrows(i0, n),
                            true,
                        );
                    }
                    geo.unrotate(dq, &cos, &sin);
                }
                geo.unrotate(&mut dk, &cos, &sin);
                (dq, dk, dv)
            })
            .collect();
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for (dq, dk, dv) in grads {
            dqs.push(dq);
            dks.push(dk);
            dvs.push(dv);
        }
        (
            geo.scatter(&dqs, self.heads, rep),
            geo.scatter(&dks, self.kv_heads, 1),
            geo.scatter(&dvs, self.kv_heads, 1),
        )
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "qlora-fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "fused attention";
        let (b, t) = self.dims(lq, lk, lv)?;
        let (out, probs): (CpuStorage, Box<dyn Any + Send>) = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (q, k, v) = (
                    contiguous(q, lq, what)?,
                    contiguous(k, lk, what)?,
                    contiguous(v, lv, what)?,
                );
                let (out, p) = self.forward(q, k, v, b, t);
                (CpuStorage::F32(out), Box::new(p))
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                let (q, k, v) = (
                    contiguous(q, lq, what)?,
                    contiguous(k, lk, what)?,
                    contiguous(v, lv, what)?,
                );
                let (out, p) = self.forward(q, k, v, b, t);
                (CpuStorage::F64(out), Box::new(p))
            }
            (q, k, v) => candle_core::bail!(
                "{what}: q, k, v must all be f32 or all f64, found {:?}, {:?}, {:?}",
                q.dtype(),
                k.dtype(),
                v.dtype()
            ),
        };
        *self.probs.lock().unwrap_or_else(|p| p.into_inner()) = Some(probs);
        Ok((out, lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, t, _) = q.dims3()?;
        let guard = self.probs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(probs) = guard.as_ref() else {
            candle_core::bail!("{}: backward before forward", self.name());
        };
        fn grads<T: Scalar + candle_core::WithDType>(
            op: &FusedAttention,
            probs: &dyn Any,
            [q, k, v, g]: [&Tensor; 4],
            t: usize,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let Some(probs) = probs.downcast_ref::<Vec<T>>() else {
                candle_core::bail!("{}: the forward pass ran in another dtype", op.name());
            };
            let data = |x: &Tensor| x.flatten_all()?.to_vec1::<T>();
            let (dq, dk, dv) = op.backward(&data(q)?, &data(k)?, &data(v)?, &data(g)?, probs, t);
            let dev = q.device();
            Ok((
                Some(Tensor::from_vec(dq, q.shape(), dev)?),
                Some(Tensor::from_vec(dk, k.shape(), dev)?),
                Some(Tensor::from_vec(dv, v.shape(), dev)?),
            ))
        }
        let g = grad_res.to_dtype(q.dtype())?;
        match q.dtype() {
            DType::F32 => grads::<f32>(self, probs.as_ref(), [q, k, v, &g], t),
            DType::F64 => grads::<f64>(self, probs.as_ref(), [q, k, v, &g], t),
            other => candle_core::bail!("{}: f32 or f64, found {other:?}", self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The model's composed form (what runs off the CPU), with the causal mask of `window`.
    #[allow(clippy::too_many_arguments)]
    fn composed(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv: usize,
        d: usize,
        window: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let t = q.dim(1)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    if j > i || i - j >= window {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), q.device())?.to_dtype(q.dtype())?;
        super::super::model::composed_attention(q, k, v, (heads, kv, d), cos, sin, &mask)
    }

    fn random(shape: (usize, usize, usize), seed: u64, dtype: DType) -> Result<Var> {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f64> = (0..n)
            .map(|i| {
                (((i as u64 + 1) * (seed * 2 + 1) * 2_654_435_761 % 1_000_003) as f64 / 1_000_003.0
                    - 0.5)
                    * 2.0
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }

    /// Output and the three gradients of the fused op equal the composed form's (f32 to 2e-5
    /// of the largest value, f64 to 1e-12), with GQA, a sliding window and uneven weights.
    #[test]
    fn fused_attention_equals_the_composed_form_both_ways() -> Result<()> {
        for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
            for &(b, t, heads, kv, d, window) in &[
                (2, 9, 6, 6, 8, usize::MAX),
                (1, 70, 4, 2, 8, usize::MAX),
                (1, 40, 2, 2, 4, 33),
                (1, 16, 4, 2, 6, 5),
                (3, 5, 6, 2, 4, 2),
            ] {
                let q = random((b, t, heads * d), 1, dtype)?;
                let k = random((b, t, kv * d), 2, dtype)?;
                let v = random((b, t, kv * d), 3, dtype)?;
                let angles: Vec<f64> = (0..t)
                    .flat_map(|i| {
                        (0..d).map(move |j| i as f64 * 0.3 / (1.0 + (j % (d / 2)) as f64))
                    })
                    .collect();
                let cos = Tensor::from_vec(
                    angles.iter().map(|a| a.cos()).collect::<Vec<_>>(),
                    (t, d),
                    &Device::Cpu,
                )?
                .to_dtype(dtype)?;
                let sin = Tensor::from_vec(
                    angles.iter().map(|a| a.sin()).collect::<Vec<_>>(),
                    (t, d),
                    &Device::Cpu,
                )?
                .to_dtype(dtype)?;
                // A weighting so that every output element gets its own gradient.
                let w = random((b, t, heads * d), 4, dtype)?;
                let op = FusedAttention::new(heads, kv, d, window, &cos, &sin)?;
                let fused = q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), op)?;
                let reference = composed(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    heads,
                    kv,
                    d,
                    window,
                    &cos,
                    &sin,
                )?;
                let gf = (fused.clone() * w.as_tensor())?.sum_all()?.backward()?;
                let gr = (reference.clone() * w.as_tensor())?.sum_all()?.backward()?;
                let close = |a: &Tensor, r: &Tensor, what: &str| -> Result<()> {
                    let scale = r
                        .abs()?
                        .max_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?
                        .max(1e-30);
                    let err = (a - r)?
                        .abs()?
                        .max_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?;
                    assert!(
                        err <= tol * scale,
                        "{what} {dtype:?} {:?}: error {err:e} of {scale:e}",
                        (b, t, heads, kv, d, window)
                    );
                    Ok(())
                };
                close(&fused, &reference, "output")?;
                for (x, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
                    close(
                        gf.get(x.as_tensor()).unwrap(),
                        gr.get(x.as_tensor()).unwrap(),
                        name,
                    )?;
                }
            }
        }
        Ok(())
    }
}
