//! The slice kernels of [`Encoder`] and [`DynamicMap::decode_scaled`] for each [`Implementation`]
//! (chosen in `crate::dispatch`): the scalar code, AVX2, AVX-512 and NEON.
//!
//! This module is safe code; the `unsafe` SIMD lives in `crate::arch`. Every implementation
//! produces the same bytes as [`DynamicMap::encode`] (tested for every implementation the machine
//! has).

use crate::encoder::Encoder;
use crate::{
    check_len, BlockwiseStatesMut, DynamicMap, Error, Implementation, OPTIMIZER_BLOCKSIZE,
};

/// How a slice kernel normalizes each input before encoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Normalize {
    /// `x` as is.
    None,
    /// `x * p` (f32 product).
    Mul,
    /// `x / p` (IEEE f32 division).
    Div,
}

/// Runs `$body` with `$k` bound to the SIMD kernel of `$imp`, or `$scalar` for the scalar code.
macro_rules! dispatch {
    ($imp:expr, $k:ident => $body:expr, $scalar:expr) => {
        match $imp {
            #[cfg(all(target_arch = "x86_64", qlora_simd))]
            Implementation::Avx512 => {
                let $k = crate::arch::x86_64::avx512::Kernel::new()
                    .expect("the AVX-512 implementation is not available on this CPU");
                $body
            }
            #[cfg(all(target_arch = "x86_64", qlora_simd))]
            Implementation::Avx2 => {
                let $k = crate::arch::x86_64::avx2::Kernel::new()
                    .expect("the AVX2 implementation is not available on this CPU");
                $body
            }
            #[cfg(all(target_arch = "aarch64", qlora_simd))]
            Implementation::Neon => {
                let $k = crate::arch::aarch64::neon::Kernel::new()
                    .expect("the NEON implementation is not available on this CPU");
                $body
            }
            Implementation::Scalar => $scalar,
            #[allow(unreachable_patterns)]
            other => panic!("the {other} implementation is not available on this machine"),
        }
    };
}

/// The slice kernels ([`Encoder::encode_slice`], [`Encoder::encode_scaled`],
/// [`Encoder::encode_divided`], the per-block forms, [`DynamicMap::decode_scaled`]) with a chosen
/// implementation: the methods use [`Implementation::active`], tests and benchmarks run a specific
/// one through these.
impl Implementation {
    /// `out[i] = enc.encode(normalize(x[i], ps[i / size]))`.
    #[inline]
    fn encode(
        self,
        enc: &Encoder,
        x: &[f32],
        how: Normalize,
        size: usize,
        ps: &[f32],
        out: &mut [u8],
    ) {
        assert!(out.len() >= x.len(), "encode: output shorter than input");
        let out = &mut out[..x.len()];
        dispatch!(self, k => k.encode(enc, x, how, size, ps, out), {
            for (x, out, p) in blocks(x, out, size, ps) {
                match how {
                    Normalize::None => scalar_encode(enc, x, out, |v| v),
                    Normalize::Mul => scalar_encode(enc, x, out, |v| v * p),
                    Normalize::Div => scalar_encode(enc, x, out, |v| v / p),
                }
            }
        })
    }

    /// [`encode`](Self::encode) with one `p` for the whole slice.
    #[inline]
    fn encode_one(self, enc: &Encoder, x: &[f32], how: Normalize, p: f32, out: &mut [u8]) {
        self.encode(enc, x, how, x.len().max(1), &[p], out)
    }

    /// [`encode`](Self::encode) by blocks of `size`, checking that there is one `p` per block.
    fn encode_blocks(
        self,
        enc: &Encoder,
        x: &[f32],
        how: Normalize,
        size: usize,
        ps: &[f32],
        out: &mut [u8],
    ) {
        check_blocks(x.len(), size, ps.len(), "one divisor or scale per block");
        self.encode(enc, x, how, size, ps, out)
    }

    /// [`Encoder::encode_slice`] with this implementation.
    ///
    /// # Panics
    /// If `out` is shorter than `xn`, or the implementation is not
    /// [available](Self::is_available) here.
    pub fn encode_slice(self, enc: &Encoder, xn: &[f32], out: &mut [u8]) {
        self.encode_one(enc, xn, Normalize::None, 1.0, out)
    }

    /// [`Encoder::encode_scaled`] with this implementation.
    ///
    /// # Panics
    /// If `out` is shorter than `values`, or the implementation is not
    /// [available](Self::is_available) here.
    pub fn encode_scaled(self, enc: &Encoder, values: &[f32], scale: f32, out: &mut [u8]) {
        self.encode_one(enc, values, Normalize::Mul, scale, out)
    }

    /// [`Encoder::encode_divided`] with this implementation.
    ///
    /// # Panics
    /// If `out` is shorter than `values`, or the implementation is not
    /// [available](Self::is_available) here.
    #[inline]
    pub fn encode_divided(self, enc: &Encoder, values: &[f32], divisor: f32, out: &mut [u8]) {
        self.encode_one(enc, values, Normalize::Div, divisor, out)
    }

    /// [`Encoder::encode_blocks_divided`] with this implementation.
    ///
    /// # Panics
    /// If `size` is 0, `divisors` does not hold one divisor per block, `out` is shorter than
    /// `values`, or the implementation is not [available](Self::is_available) here.
    pub fn encode_blocks_divided(
        self,
        enc: &Encoder,
        values: &[f32],
        size: usize,
        divisors: &[f32],
        out: &mut [u8],
    ) {
        self.encode_blocks(enc, values, Normalize::Div, size, divisors, out)
    }

    /// [`Encoder::encode_blocks_scaled`] with this implementation.
    ///
    /// # Panics
    /// If `size` is 0, `scales` does not hold one scale per block, `out` is shorter than
    /// `values`, or the implementation is not [available](Self::is_available) here.
    pub fn encode_blocks_scaled(
        self,
        enc: &Encoder,
        values: &[f32],
        size: usize,
        scales: &[f32],
        out: &mut [u8],
    ) {
        self.encode_blocks(enc, values, Normalize::Mul, size, scales, out)
    }

    /// One update of two 8-bit blockwise states in place, block by block (blocks of
    /// [`OPTIMIZER_BLOCKSIZE`] elements), as bitsandbytes' fused 8-bit optimizer kernels do it.
    ///
    /// For block `j`: both states are dequantized with the block's old absmax into 256-lane f32
    /// buffers (the lanes past a partial last block hold `padding[k]` dequantized, as the kernels
    /// load them); `update(j, s1, s2)` updates them and returns their new absmax `[a1, a2]`;
    /// the first `len` lanes are re-quantized as `s / a` (IEEE division, the optimizers'
    /// normalization, encoded like [`Encoder::encode_divided`]); `after(j, codes1, codes2, s1,
    /// s2)` sees the new codes (for fix-ups such as the first moment's sign fix); the new absmax
    /// is stored.
    ///
    /// One call covers every block, so the SIMD tables are set up once (AVX-512 with VBMI runs
    /// it all in one function; the other implementations call their slice kernels per block).
    /// Run `update` in the caller's SIMD context for speed: the closure is inlined here.
    ///
    /// ```
    /// use qlora_double_quant::{
    ///     BlockwiseStatesMut, DynamicMap, Encoder, Implementation, OPTIMIZER_BLOCKSIZE,
    /// };
    ///
    /// // Halve both states of 300 elements (two blocks, the second partial).
    /// let n = 300;
    /// let (mut c1, mut c2) = (vec![200u8; n], vec![100u8; n]);
    /// let (mut a1, mut a2) = (vec![2.0f32; 2], vec![4.0f32; 2]);
    /// let states = BlockwiseStatesMut {
    ///     state1: &mut c1,
    ///     absmax1: &mut a1,
    ///     state2: &mut c2,
    ///     absmax2: &mut a2,
    /// };
    /// Implementation::best()
    ///     .update_blockwise(
    ///         [Encoder::signed(), Encoder::unsigned()],
    ///         [128, 0],
    ///         states,
    ///         |_, s1, s2| {
    ///             s1.iter_mut().chain(s2.iter_mut()).for_each(|x| *x *= 0.5);
    ///             let max = |s: &[f32; OPTIMIZER_BLOCKSIZE]| s.iter().fold(0f32, |m, x| m.max(x.abs()));
    ///             [max(s1), max(s2)]
    ///         },
    ///         |_, _, _, _, _| {},
    ///     )
    ///     .unwrap();
    /// // Every element of a block equals its absmax now, so each code becomes 1.0's.
    /// assert_eq!(a1[0], DynamicMap::signed().decode(200));
    /// assert_eq!(a2[0], DynamicMap::unsigned().decode(100) * 2.0);
    /// assert_eq!((c1[0], c2[0]), (255, 255));
    /// ```
    ///
    /// # Errors
    /// When the lengths do not fit: `state2` as long as `state1`, one absmax of each per block.
    ///
    /// # Panics
    /// If the implementation is not [available](Self::is_available) here.
    #[inline(always)]
    pub fn update_blockwise<U, A>(
        self,
        encoders: [&Encoder; 2],
        padding: [u8; 2],
        states: BlockwiseStatesMut<'_>,
        mut update: U,
        mut after: A,
    ) -> Result<(), Error>
    where
        U: FnMut(
            usize,
            &mut [f32; OPTIMIZER_BLOCKSIZE],
            &mut [f32; OPTIMIZER_BLOCKSIZE],
        ) -> [f32; 2],
        A: FnMut(
            usize,
            &mut [u8],
            &mut [u8],
            &[f32; OPTIMIZER_BLOCKSIZE],
            &[f32; OPTIMIZER_BLOCKSIZE],
        ),
    {
        const B: usize = OPTIMIZER_BLOCKSIZE;
        let n = states.state1.len();
        let nb = n.div_ceil(B);
        check_len("state2", n, states.state2.len())?;
        check_len("absmax1", nb, states.absmax1.len())?;
        check_len("absmax2", nb, states.absmax2.len())?;
        assert!(
            self.is_available(),
            "the {self} implementation is not available on this machine"
        );
        #[cfg(all(target_arch = "x86_64", qlora_simd))]
        let states = match (self, crate::arch::x86_64::avx512::Kernel::new()) {
            (Implementation::Avx512, Some(k)) => {
                match k.update_blocks(encoders, padding, states, &mut update, &mut after) {
                    Ok(()) => return Ok(()),
                    Err(states) => states,
                }
            }
            _ => states,
        };
        let maps = encoders.map(|e| e.map());
        let (mut s1, mut s2) = ([0f32; B], [0f32; B]);
        let blocks = states
            .state1
            .chunks_mut(B)
            .zip(states.state2.chunks_mut(B))
            .zip(states.absmax1.iter_mut().zip(states.absmax2.iter_mut()));
        for (j, ((c1, c2), (a1, a2))) in blocks.enumerate() {
            let m = c1.len();
            self.decode_scaled(maps[0], c1, *a1, &mut s1[..m]);
            self.decode_scaled(maps[1], c2, *a2, &mut s2[..m]);
            s1[m..].fill(maps[0].decode(padding[0]) * *a1);
            s2[m..].fill(maps[1].decode(padding[1]) * *a2);
            let [new1, new2] = update(j, &mut s1, &mut s2);
            self.encode_divided(encoders[0], &s1[..m], new1, c1);
            self.encode_divided(encoders[1], &s2[..m], new2, c2);
            after(j, c1, c2, &s1, &s2);
            *a1 = new1;
            *a2 = new2;
        }
        Ok(())
    }

    /// [`DynamicMap::decode_scaled`] with this implementation.
    ///
    /// # Panics
    /// If `out` is shorter than `codes`, or the implementation is not
    /// [available](Self::is_available) here.
    #[inline]
    pub fn decode_scaled(self, map: &DynamicMap, codes: &[u8], scale: f32, out: &mut [f32]) {
        self.decode(map, codes, codes.len().max(1), &[scale], out)
    }

    /// [`DynamicMap::decode_blocks_scaled`] with this implementation.
    ///
    /// # Panics
    /// If `size` is 0, `scales` does not hold one scale per block, `out` is shorter than
    /// `codes`, or the implementation is not [available](Self::is_available) here.
    pub fn decode_blocks_scaled(
        self,
        map: &DynamicMap,
        codes: &[u8],
        size: usize,
        scales: &[f32],
        out: &mut [f32],
    ) {
        check_blocks(codes.len(), size, scales.len(), "one scale per block");
        self.decode(map, codes, size, scales, out)
    }

    #[inline]
    fn decode(self, map: &DynamicMap, codes: &[u8], size: usize, scales: &[f32], out: &mut [f32]) {
        assert!(
            out.len() >= codes.len(),
            "decode_scaled: output shorter than input"
        );
        let out = &mut out[..codes.len()];
        dispatch!(self, k => k.decode_scaled(map, codes, size, scales, out), {
            for (codes, out, scale) in blocks(codes, out, size, scales) {
                for (o, &c) in out.iter_mut().zip(codes) {
                    *o = map.values()[c as usize] * scale;
                }
            }
        })
    }
}

/// The blocks of a per-block kernel call: `size` elements of `x` and of `out` with the factor
/// (scale or divisor) of each block; the last block may be shorter.
pub(crate) fn blocks<'a, T, U>(
    x: &'a [T],
    out: &'a mut [U],
    size: usize,
    factors: &'a [f32],
) -> impl Iterator<Item = (&'a [T], &'a mut [U], f32)> {
    x.chunks(size)
        .zip(out.chunks_mut(size))
        .zip(factors)
        .map(|((x, out), &p)| (x, out, p))
}

/// The checks of the block forms: `size > 0` and one factor per started block of `n` elements.
///
/// # Panics
/// With `block size 0`, or with `what` when `factors` is not the number of blocks.
fn check_blocks(n: usize, size: usize, factors: usize, what: &str) {
    assert!(size > 0, "block size 0");
    assert_eq!(factors, n.div_ceil(size), "{what}");
}

#[inline(always)]
fn scalar_encode(enc: &Encoder, x: &[f32], out: &mut [u8], norm: impl Fn(f32) -> f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = enc.encode(norm(v));
    }
}
