//! The causal softmax of attention scores, one `[t, t]` block at a time, both ways (used by the
//! fused attention op, [`super::attention`]), and the float types of the crate's fused CPU ops.
//!
//! The forward pass computes exactly what the composed form computes (`x·scale`, masked to
//! `-inf`, the row max, `exp(x − max)`, the sequential sum, the division), so the logits do not
//! change; the backward pass is `scale · p ⊙ (g − Σ g ⊙ p)` per row.

/// The floating-point types of the fused ops (f32 and f64).
pub(crate) trait Float:
    Copy + PartialOrd + std::ops::Mul<Output = Self> + Send + Sync
{
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn exp(self) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
    fn neg(self) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline]
            fn div(self, o: Self) -> Self {
                self / o
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn neg(self) -> Self {
                -self
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
float!(f32);
float!(f64);

/// `out = softmax(scale · s + mask)` over the rows of one `[t, t]` block `s` (query `i` = row
/// `i`); position `(i, j)` is masked when `j > i` or `i − j ≥ window`.
pub(crate) fn forward_into<T: Float>(s: &[T], out: &mut [T], t: usize, scale: T, window: usize) {
    for (i, (row, o)) in s.chunks_exact(t).zip(out.chunks_exact_mut(t)).enumerate() {
        let visible = |j: usize| j <= i && i - j < window;
        let mut max = T::NEG_INFINITY;
        for (j, (&x, o)) in row.iter().zip(o.iter_mut()).enumerate() {
            let v = if visible(j) {
                x * scale
            } else {
                T::NEG_INFINITY
            };
            *o = v;
            if v > max {
                max = v;
            }
        }
        // Masked positions are exp(−∞) = 0 and add nothing to the sum: skip their exp.
        let mut sum = T::ZERO;
        for (j, o) in o.iter_mut().enumerate() {
            if visible(j) {
                let e = o.sub(max).exp();
                *o = e;
                sum = sum.add(e);
            } else {
                *o = T::ZERO;
            }
        }
        for o in o.iter_mut() {
            *o = o.div(sum);
        }
    }
}

/// The gradient of the scores from the probabilities `p` and their gradient `g` (rows of `t`):
/// `out = scale · p ⊙ (g − Σ_row g ⊙ p)`.
pub(crate) fn backward_into<T: Float>(p: &[T], g: &[T], out: &mut [T], t: usize, scale: T) {
    for ((p, g), o) in p
        .chunks_exact(t)
        .zip(g.chunks_exact(t))
        .zip(out.chunks_exact_mut(t))
    {
        let mut dot = T::ZERO;
        for (&p, &g) in p.iter().zip(g) {
            dot = dot.add(p * g);
        }
        for ((&p, &g), o) in p.iter().zip(g).zip(o.iter_mut()) {
            *o = p * g.sub(dot) * scale;
        }
    }
}
