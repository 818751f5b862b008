//! The per-tensor update kernels: bitsandbytes' `kOptimizerStatic8bit2StateBlockwise<T, ADAM>`
//! (fused 8-bit blockwise Adam) and `kOptimizer32bit2State<T, ADAM>`, in IEEE f32.
//!
//! Both follow the CUDA kernels' arithmetic order operation by operation. Where CUDA is compiled
//! with `--use_fast_math` (`__powf`, `__fdividef`, approximate `sqrtf`, FMA contraction, flush of
//! subnormals) these functions use correctly rounded IEEE f32 operations (`powf`, `/`, `sqrt`,
//! no contraction), so a GPU may differ from them in the last bit of an intermediate, and through
//! that, rarely, by one 8-bit code.

use crate::element::Element;
use crate::error::Error;
use qlora_double_quant::{DynamicMap, Encoder, OPTIMIZER_BLOCKSIZE};
use rayon::prelude::*;

/// Tensors of at least this many elements are updated on the rayon pool.
pub const PARALLEL_THRESHOLD: usize = 1 << 15;

/// Elements handed to one rayon task (a multiple of the 256-element block).
const TASK_ELEMS: usize = 16 * OPTIMIZER_BLOCKSIZE;

/// The scalars of one Adam step, exactly as bitsandbytes passes them to its kernels (all f32,
/// `step` as an integer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay β₁.
    pub beta1: f32,
    /// Second-moment decay β₂.
    pub beta2: f32,
    /// ε of the denominator (scaled by the bias correction `c2`, see [`AdamStep::corrections`]).
    pub eps: f32,
    /// Decoupled weight decay, applied after the Adam step when `> 0`.
    pub weight_decay: f32,
    /// The 1-based step number of this parameter (bitsandbytes increments `state["step"]` before
    /// the update, so the first update has `step = 1`).
    pub step: u32,
    /// Factor applied to every gradient element first (gradient clipping); 1 for none.
    pub gnorm_scale: f32,
}

impl AdamStep {
    /// Check the ranges bitsandbytes' Python side checks (and `step ≥ 1`).
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |name, value: f32, reason| {
            Err(Error::HyperParameter {
                name,
                value: value as f64,
                reason,
            })
        };
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return bad("lr", self.lr, "must be finite and >= 0");
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", self.beta1, "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", self.beta2, "must be in [0, 1)");
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return bad("eps", self.eps, "must be finite and >= 0");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", self.weight_decay, "must be finite and >= 0");
        }
        if !self.gnorm_scale.is_finite() {
            return bad("gnorm_scale", self.gnorm_scale, "must be finite");
        }
        if self.step == 0 || self.step > i32::MAX as u32 {
            return Err(Error::HyperParameter {
                name: "step",
                value: self.step as f64,
                reason: "must be in 1..=i32::MAX (the kernels take an int32)",
            });
        }
        Ok(())
    }

    /// The kernel prologue: `c1 = 1 - β₁^step`, `c2 = sqrt(1 - β₂^step)`,
    /// `step_size = (-lr · c2) / c1`, all in f32.
    pub fn corrections(&self) -> (f32, f32, f32) {
        let t = self.step as f32;
        let c1 = 1.0f32 - self.beta1.powf(t);
        let c2 = (1.0f32 - self.beta2.powf(t)).sqrt();
        let step_size = (-self.lr * c2) / c1;
        (c1, c2, step_size)
    }
}

/// Loop-invariant scalars, computed once per tensor.
#[derive(Clone, Copy)]
struct Consts {
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    gnorm_scale: f32,
    c2_eps: f32,
    step_size: f32,
    decay: Option<f32>,
}

impl Consts {
    fn new(hp: &AdamStep) -> Self {
        let (_, c2, step_size) = hp.corrections();
        Consts {
            beta1: hp.beta1,
            beta2: hp.beta2,
            one_minus_beta1: 1.0 - hp.beta1,
            one_minus_beta2: 1.0 - hp.beta2,
            gnorm_scale: hp.gnorm_scale,
            // 8-bit kernel: `correction2 * eps`; 32-bit kernel: `eps * correction2` (same product).
            c2_eps: c2 * hp.eps,
            step_size,
            decay: (hp.weight_decay > 0.0).then_some(1.0 - hp.lr * hp.weight_decay),
        }
    }
}

/// Mutable views of the four 8-bit blockwise state tensors of one parameter.
#[derive(Debug)]
pub struct Blockwise8bitMut<'a> {
    /// First-moment codes (signed dynamic map), one per element.
    pub state1: &'a mut [u8],
    /// Second-moment codes (unsigned dynamic map), one per element.
    pub state2: &'a mut [u8],
    /// Per-256-block absmax of the first moment.
    pub absmax1: &'a mut [f32],
    /// Per-256-block absmax of the second moment.
    pub absmax2: &'a mut [f32],
}

fn check_len(what: &str, expected: usize, found: usize) -> Result<(), Error> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::length(what, expected, found))
    }
}

/// One Adam/AdamW step of a parameter with 8-bit blockwise states (bitsandbytes'
/// `kOptimizerStatic8bit2StateBlockwise<T, ADAM, 256, 1>`), in place.
///
/// Per 256-element block, in one pass: dequantize both states with the block's *old* absmax,
/// update them in f32, reduce the new absmax, update the parameter, re-quantize with the new
/// absmax (nearest code, ties to the even index, sign fix for the first moment). Elements whose
/// gradient is NaN or ±inf get both states reset to 0 and keep their parameter. In a partial
/// last block the missing lanes contribute `|qmap1[128] · absmax1_old · β₁|` to the new absmax1,
/// as the kernel's padding does.
///
/// Errors when the buffer lengths do not fit `params.len()` or a hyper-parameter is invalid.
pub fn adam_step_8bit<P: Element, G: Element>(
    params: &mut [P],
    grads: &[G],
    state: Blockwise8bitMut<'_>,
    hp: &AdamStep,
) -> Result<(), Error> {
    hp.validate()?;
    let n = params.len();
    let nb = n.div_ceil(OPTIMIZER_BLOCKSIZE);
    check_len("grad", n, grads.len())?;
    check_len("state1", n, state.state1.len())?;
    check_len("state2", n, state.state2.len())?;
    check_len("absmax1", nb, state.absmax1.len())?;
    check_len("absmax2", nb, state.absmax2.len())?;
    let k = Consts::new(hp);
    let blocks_per_task = TASK_ELEMS / OPTIMIZER_BLOCKSIZE;
    type Task<'t, P, G> = (
        (
            (((&'t mut [P], &'t [G]), &'t mut [u8]), &'t mut [u8]),
            &'t mut [f32],
        ),
        &'t mut [f32],
    );
    let task = |(((((p, g), c1), c2), a1), a2): Task<'_, P, G>| {
        for (((((p, g), c1), c2), a1), a2) in p
            .chunks_mut(OPTIMIZER_BLOCKSIZE)
            .zip(g.chunks(OPTIMIZER_BLOCKSIZE))
            .zip(c1.chunks_mut(OPTIMIZER_BLOCKSIZE))
            .zip(c2.chunks_mut(OPTIMIZER_BLOCKSIZE))
            .zip(a1.iter_mut())
            .zip(a2.iter_mut())
        {
            block_8bit(p, g, c1, c2, a1, a2, &k);
        }
    };
    if n >= PARALLEL_THRESHOLD {
        params
            .par_chunks_mut(TASK_ELEMS)
            .zip(grads.par_chunks(TASK_ELEMS))
            .zip(state.state1.par_chunks_mut(TASK_ELEMS))
            .zip(state.state2.par_chunks_mut(TASK_ELEMS))
            .zip(state.absmax1.par_chunks_mut(blocks_per_task))
            .zip(state.absmax2.par_chunks_mut(blocks_per_task))
            .for_each(task);
    } else {
        task((
            (
                (((params, grads), state.state1), state.state2),
                state.absmax1,
            ),
            state.absmax2,
        ));
    }
    Ok(())
}

/// One block (≤ 256 elements) of the fused 8-bit update.
///
/// Three passes over stack buffers (the block stays in L1): moments and their absmax, the
/// parameter update (branch-free, so it vectorizes for f32), the normalization (vectorized
/// division) and the encoding.
#[inline]
fn block_8bit<P: Element, G: Element>(
    p: &mut [P],
    g: &[G],
    c1: &mut [u8],
    c2: &mut [u8],
    absmax1: &mut f32,
    absmax2: &mut f32,
    k: &Consts,
) {
    const B: usize = OPTIMIZER_BLOCKSIZE;
    let q1 = DynamicMap::signed().values();
    let q2 = DynamicMap::unsigned().values();
    let n = p.len();
    let (p, g, c1, c2) = (&mut p[..n], &g[..n], &mut c1[..n], &mut c2[..n]);
    let old1 = *absmax1;
    let old2 = *absmax2;
    let mut s1 = [0.0f32; B];
    let mut s2 = [0.0f32; B];
    let mut finite = [false; B];
    let (s1, s2, finite) = (&mut s1[..n], &mut s2[..n], &mut finite[..n]);
    // cub's reduction starts from -FLT_MAX; fmaxf (like f32::max) skips NaN.
    let mut new1 = f32::MIN;
    let mut new2 = f32::MIN;
    for j in 0..n {
        let gv = g[j].to_f32();
        let ok = gv.abs() < f32::INFINITY; // finite (false for NaN)
        let gs = gv * k.gnorm_scale;
        let v = q2[c2[j] as usize] * old2;
        let v = v * k.beta2 + k.one_minus_beta2 * gs * gs;
        let m = q1[c1[j] as usize] * old1;
        let m = m * k.beta1 + k.one_minus_beta1 * gs;
        // A non-finite gradient resets both moments of its element to 0.
        let (m, v) = if ok { (m, v) } else { (0.0, 0.0) };
        finite[j] = ok;
        s1[j] = m;
        s2[j] = v;
        // fmaxf semantics (a NaN operand is skipped) with one compare: the running max is
        // never NaN, and `NaN > max` is false.
        let (am, av) = (m.abs(), v.abs());
        new1 = if am > new1 { am } else { new1 };
        new2 = if av > new2 { av } else { new2 };
    }
    if n < B {
        // Padding lanes of the last block load g = 0, state1 code 128, state2 code 0.
        let m = q1[128] * old1;
        let m = m * k.beta1 + k.one_minus_beta1 * 0.0;
        let v = q2[0] * old2;
        let v = v * k.beta2 + k.one_minus_beta2 * 0.0 * 0.0;
        new1 = new1.max(m.abs());
        new2 = new2.max(v.abs());
    }
    *absmax1 = new1;
    *absmax2 = new2;
    match k.decay {
        Some(decay) => {
            for j in 0..n {
                let x = p[j].to_f32() + k.step_size * (s1[j] / (s2[j].sqrt() + k.c2_eps));
                let x = P::from_f32(P::from_f32(x).to_f32() * decay);
                p[j] = if finite[j] { x } else { p[j] };
            }
        }
        None => {
            for j in 0..n {
                let x = p[j].to_f32() + k.step_size * (s1[j] / (s2[j].sqrt() + k.c2_eps));
                let x = P::from_f32(x);
                p[j] = if finite[j] { x } else { p[j] };
            }
        }
    }
    // Normalize (IEEE division, vectorized), then encode. Normalized values lie in [-1, 1]
    // unless the block holds NaN (0/0 of an all-zero block, or an overflow to inf), which takes
    // the exact slow path.
    let mut xn1 = [0.0f32; B];
    let mut xn2 = [0.0f32; B];
    let (xn1, xn2) = (&mut xn1[..n], &mut xn2[..n]);
    let mut in_range = true;
    for j in 0..n {
        xn1[j] = s1[j] / new1;
        xn2[j] = s2[j] / new2;
        in_range &= (xn1[j].abs() <= 1.0) & (xn2[j].abs() <= 1.0);
    }
    let e1 = Encoder::signed();
    let e2 = Encoder::unsigned();
    if in_range {
        for j in 0..n {
            c1[j] = sign_fix(e1.encode_in_range(xn1[j]), s1[j]);
            c2[j] = e2.encode_in_range(xn2[j]);
        }
    } else {
        for j in 0..n {
            c1[j] = sign_fix(e1.encode(xn1[j]), s1[j]);
            c2[j] = e2.encode(xn2[j]);
        }
    }
}

/// The kernel's sign fix: a first moment whose code has the other sign moves one code towards
/// its own sign (u8 arithmetic, so 0 − 1 wraps to 255).
#[inline(always)]
fn sign_fix(code: u8, m: f32) -> u8 {
    // qmap1 holds 127 negative codes (0..=126), +0.0 (127) and positives (128..=255).
    let flip = (code < 127) != m.is_sign_negative();
    let step = if m > 0.0 { 1u8 } else { 255u8 };
    code.wrapping_add(step & 0u8.wrapping_sub(u8::from(flip)))
}

/// One Adam/AdamW step of a parameter with f32 states (bitsandbytes'
/// `kOptimizer32bit2State<T, ADAM>` without `max_unorm`, `skip_zeros = false`), in place.
///
/// Unlike the 8-bit kernel this one does not mask non-finite gradients: a NaN gradient makes the
/// states and the parameter of that element NaN, as on CUDA.
pub fn adam_step_32bit<P: Element, G: Element>(
    params: &mut [P],
    grads: &[G],
    state1: &mut [f32],
    state2: &mut [f32],
    hp: &AdamStep,
) -> Result<(), Error> {
    hp.validate()?;
    let n = params.len();
    check_len("grad", n, grads.len())?;
    check_len("state1", n, state1.len())?;
    check_len("state2", n, state2.len())?;
    let k = Consts::new(hp);
    type Task<'t, P, G> = (((&'t mut [P], &'t [G]), &'t mut [f32]), &'t mut [f32]);
    let task = |(((p, g), s1), s2): Task<'_, P, G>| {
        for (((p, g), s1), s2) in p.iter_mut().zip(g).zip(s1).zip(s2) {
            // The kernel scales g in its own type T (`g_vals[j] = gnorm_scale * (float)g_vals[j]`).
            let gv = G::from_f32(k.gnorm_scale * g.to_f32()).to_f32();
            *s1 = *s1 * k.beta1 + k.one_minus_beta1 * gv;
            *s2 = *s2 * k.beta2 + k.one_minus_beta2 * (gv * gv);
            let x = p.to_f32() + k.step_size * (*s1 / (s2.sqrt() + k.c2_eps));
            let mut x = P::from_f32(x);
            if let Some(decay) = k.decay {
                x = P::from_f32(x.to_f32() * decay);
            }
            *p = x;
        }
    };
    if n >= PARALLEL_THRESHOLD {
        params
            .par_chunks_mut(TASK_ELEMS)
            .zip(grads.par_chunks(TASK_ELEMS))
            .zip(state1.par_chunks_mut(TASK_ELEMS))
            .zip(state2.par_chunks_mut(TASK_ELEMS))
            .for_each(task);
    } else {
        task((((params, grads), state1), state2));
    }
    Ok(())
}
