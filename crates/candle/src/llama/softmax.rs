//! The causal softmax of attention scores, one `[t, t]` block at a time, both ways (used by the
//! fused attention op, [`super::attention`]), and the float types of the crate's fused CPU ops.
//!
//! The forward pass computes what the composed form computes (`x·scale`, masked to `-inf`, the row
//! max, `exp(x − max)`, the sum, the division), in a form that vectorizes: f32's `exp` is a
//! polynomial ([`exp_f32`], within 2 ulp) instead of libm's one call per element (which was a
//! tenth of a training step), and the max and the sums run in 8 interleaved lanes ([`lanes`]), so
//! values differ from the composed form's in the last bits. The backward pass is
//! `scale · p ⊙ (g − Σ g ⊙ p)` per row.

/// The floating-point types of the fused ops (f32 and f64).
pub(crate) trait Float:
    Copy + PartialOrd + std::ops::Mul<Output = Self> + Send + Sync
{
    const ZERO: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    /// `eˣ`: [`exp_f32`] for f32 (arguments ≤ 88), the libm `exp` for f64.
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
    ($t:ty, $exp:path) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
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
float!(f32, exp_f32);
float!(f64, f64::exp);

/// `out = softmax(scale · s + mask)` over the rows of one `[t, t]` block `s` (query `i` = row
/// `i`); position `(i, j)` is masked when `j > i` or `i − j ≥ window`.
pub(crate) fn forward_into<T: Float>(s: &[T], out: &mut [T], t: usize, scale: T, window: usize) {
    for (i, (row, o)) in s.chunks_exact(t).zip(out.chunks_exact_mut(t)).enumerate() {
        // Row i sees columns lo..=i; the others are exp(−∞) = 0 and add nothing to the sum.
        let lo = (i + 1).saturating_sub(window);
        let seen = &mut o[lo..=i];
        for (o, &x) in seen.iter_mut().zip(&row[lo..=i]) {
            *o = x * scale;
        }
        let max = lanes(
            seen,
            T::NEG_INFINITY,
            |acc, v| if v > acc { v } else { acc },
        );
        for o in seen.iter_mut() {
            *o = o.sub(max).exp();
        }
        let sum = lanes(seen, T::ZERO, |acc, e| acc.add(e));
        for o in seen.iter_mut() {
            *o = o.div(sum);
        }
        o[..lo].fill(T::ZERO);
        o[i + 1..].fill(T::ZERO);
    }
}

/// A reduction of `x` in 8 interleaved lanes (so that it vectorizes), the lanes then folded in
/// order: a fixed order, independent of threads.
#[inline(always)]
pub(crate) fn lanes<T: Float>(x: &[T], init: T, f: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            acc[k] = f(acc[k], c[k]);
        }
    }
    let mut r = init;
    for &a in &acc {
        r = f(r, a);
    }
    for &v in chunks.remainder() {
        r = f(r, v);
    }
    r
}

/// The gradient of the scores from the probabilities `p` and their gradient `g` (rows of `t`):
/// `out = scale · p ⊙ (g − Σ_row g ⊙ p)`.
pub(crate) fn backward_into<T: Float>(p: &[T], g: &[T], out: &mut [T], t: usize, scale: T) {
    let mut pg = vec![T::ZERO; t];
    for ((p, g), o) in p
        .chunks_exact(t)
        .zip(g.chunks_exact(t))
        .zip(out.chunks_exact_mut(t))
    {
        for ((pg, &p), &g) in pg.iter_mut().zip(p).zip(g) {
            *pg = p * g;
        }
        let dot = lanes(&pg, T::ZERO, |acc, v| acc.add(v));
        for ((&p, &g), o) in p.iter().zip(g).zip(o.iter_mut()) {
            *o = p * g.sub(dot) * scale;
        }
    }
}

/// `eˣ` in f32 for `x ≤ 88`, in a form the compiler vectorizes (no branch, no libm call):
/// `x = n·ln 2 + r` (Cody–Waite, two constants), Cephes' polynomial for `eʳ` on
/// `|r| ≤ ln 2 / 2`, and `2ⁿ` built from its exponent bits. Within 2 ulp of the correctly
/// rounded result for `−87 ≤ x ≤ 88` (tested over that range); 0 below −87 (where the result
/// would be below f32's smallest normal); NaN stays NaN.
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * 0.693_359_375 - n * -2.121_944_400_546_905_827_68e-4;
    let mut p = 1.987_569_150_0e-4f32;
    p = p * r + 1.398_199_950_7e-3;
    p = p * r + 8.333_451_907_3e-3;
    p = p * r + 4.166_579_589_4e-2;
    p = p * r + 1.666_666_545_9e-1;
    p = p * r + 5.000_000_120_1e-1;
    let er = p * r * r + r + 1.0;
    let exponent = (t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) as u32;
    let out = er * f32::from_bits(exponent << 23);
    if x < -87.0 {
        0.0
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`exp_f32`] is within 2 ulp of the correctly rounded `eˣ` (f64's exp, rounded) over
    /// [−87, 88], 0 below, NaN for NaN.
    #[test]
    fn exp_f32_is_within_two_ulp() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = (x as f64).exp() as f32;
            let got = exp_f32(x);
            let ulps = (got.to_bits() as i64 - exact.to_bits() as i64).unsigned_abs() as u32;
            assert!(ulps <= 2, "exp({x}) = {got}, correctly rounded {exact}");
            worst = worst.max(ulps);
            x += 0.000_731;
        }
        for x in [-1e-30f32, -0.0, 0.0, 1e-30, -0.3465736, 0.3465736] {
            let exact = (x as f64).exp() as f32;
            assert!(
                (exp_f32(x).to_bits() as i64 - exact.to_bits() as i64).abs() <= 2,
                "{x}"
            );
        }
        assert_eq!(exp_f32(-87.5), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(worst <= 2);
    }
}
