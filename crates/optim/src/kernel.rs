//! The per-tensor update kernels: bitsandbytes' `kOptimizerStatic8bit2StateBlockwise<T, ADAM>`
//! (fused 8-bit blockwise Adam) and `kOptimizer32bit2State<T, ADAM>`, in IEEE f32.
//!
//! Both follow the CUDA kernels' arithmetic order operation by operation. Where CUDA is compiled
//! with `--use_fast_math` (`__powf`, `__fdividef`, approximate `sqrtf`, FMA contraction, flush of
//! subnormals) these functions use correctly rounded IEEE f32 operations (`powf`, `/`, `sqrt`,
//! no contraction), so a GPU may differ from them in the last bit of an intermediate, and through
//! that, rarely, by one 8-bit code.

use crate::element::{Dtype, Element};
use crate::error::Error;
use qlora_double_quant::{BlockwiseStatesMut, Encoder, Implementation, OPTIMIZER_BLOCKSIZE};
use rayon::prelude::*;
use std::cell::Cell;

/// Tensors of at least this many elements are updated on the rayon pool.
pub const PARALLEL_THRESHOLD: usize = 1 << 15;

/// Elements in one item of the rayon iteration (a multiple of the 256-element block): 4 Ki
/// elements, several microseconds of work (rayon splits the items into jobs adaptively, so this
/// is only the finest granularity), small enough that a LoRA-sized tensor (tens of thousands of
/// elements) still spreads over many threads.
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
pub(crate) struct Consts {
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
/// Runs [`Implementation::active`]; every implementation gives the same bits.
///
/// Errors when the buffer lengths do not fit `params.len()` or a hyper-parameter is invalid.
pub fn adam_step_8bit<P: Element, G: Element>(
    params: &mut [P],
    grads: &[G],
    state: Blockwise8bitMut<'_>,
    hp: &AdamStep,
) -> Result<(), Error> {
    Implementation::active().adam_step_8bit(params, grads, state, hp)
}

fn step_8bit<P: Element, G: Element>(
    imp: Implementation,
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
    if n >= PARALLEL_THRESHOLD {
        params
            .par_chunks_mut(TASK_ELEMS)
            .zip(grads.par_chunks(TASK_ELEMS))
            .zip(state.state1.par_chunks_mut(TASK_ELEMS))
            .zip(state.state2.par_chunks_mut(TASK_ELEMS))
            .zip(state.absmax1.par_chunks_mut(blocks_per_task))
            .zip(state.absmax2.par_chunks_mut(blocks_per_task))
            .for_each(|(((((p, g), c1), c2), a1), a2)| {
                let t = Task8 {
                    p,
                    g,
                    c1,
                    c2,
                    a1,
                    a2,
                };
                crate::arch::run_8bit(imp, t, &k);
            });
    } else {
        let t = Task8 {
            p: params,
            g: grads,
            c1: state.state1,
            c2: state.state2,
            a1: state.absmax1,
            a2: state.absmax2,
        };
        crate::arch::run_8bit(imp, t, &k);
    }
    Ok(())
}

/// A run of whole 256-blocks of one 8-bit update (lengths checked by the caller: `p`, `g`, `c1`,
/// `c2` of equal length, one absmax of each state per started block).
pub(crate) struct Task8<'t, P, G> {
    pub(crate) p: &'t mut [P],
    pub(crate) g: &'t [G],
    pub(crate) c1: &'t mut [u8],
    pub(crate) c2: &'t mut [u8],
    pub(crate) a1: &'t mut [f32],
    pub(crate) a2: &'t mut [f32],
}

/// The 8-bit update of one task, block by block, through `qlora-double-quant`'s
/// [`update_blockwise`](qlora_double_quant::Implementation::update_blockwise) (one call per task:
/// the SIMD tables are set up once). Inlined into each `crate::arch` copy, which compiles it (and
/// the block closure, inlined into the double-quant driver) for its instruction set.
///
/// Per 256-element block:
/// 1. `update_blockwise` dequantizes both states with the block's old absmax (a partial last
///    block's padding lanes load state1 code 128 and state2 code 0, as the kernel's do);
/// 2. [`block_update`]: the moment updates, the non-finite-gradient reset, the new absmax and
///    the parameter update, in branch-free loops;
/// 3. `update_blockwise` re-quantizes with `s / new_absmax`, then the sign fix runs on the
///    first moment's codes.
///
/// `block` is [`block_update`] with `k` wrapped in a closure by the caller: a closure defined
/// inside a `#[target_feature]` function is compiled with its features even where it is not
/// inlined.
#[inline(always)]
pub(crate) fn task_8bit<P: Element, G: Element, F>(t: Task8<'_, P, G>, mut block: F)
where
    F: FnMut(
        &mut [P],
        &[G],
        &mut [f32; OPTIMIZER_BLOCKSIZE],
        &mut [f32; OPTIMIZER_BLOCKSIZE],
        &mut [f32; OPTIMIZER_BLOCKSIZE],
    ) -> [f32; 2],
{
    const B: usize = OPTIMIZER_BLOCKSIZE;
    let Task8 {
        p,
        g,
        c1,
        c2,
        a1,
        a2,
    } = t;
    let n = g.len();
    let (c1p, c2p) = (c1.as_ptr(), c2.as_ptr());
    let mut gbuf = [0f32; B];
    // Whether the block being re-quantized has a first-moment absmax of 0 or +inf (set by
    // `update`, read by the sign fix).
    let odd_absmax1 = Cell::new(false);
    let states = BlockwiseStatesMut {
        state1: c1,
        absmax1: a1,
        state2: c2,
        absmax2: a2,
    };
    let pp = p.as_ptr();
    let update = |j: usize, s1: &mut [f32; B], s2: &mut [f32; B]| {
        let lo = j * B;
        let hi = (lo + B).min(n);
        let new_absmax = block(&mut p[lo..hi], &g[lo..hi], s1, s2, &mut gbuf);
        odd_absmax1.set(!(new_absmax[0] > 0.0 && new_absmax[0] < f32::INFINITY));
        // Hint the next block into the cache while this one is re-quantized (pure computation
        // on L1 data). Measured on Zen 4: this place beats the start of the block, and one block
        // ahead beats two.
        if hi < n {
            let len = B.min(n - hi);
            crate::arch::prefetch(pp.wrapping_add(hi), len);
            crate::arch::prefetch(g.as_ptr().wrapping_add(hi), len);
            crate::arch::prefetch(c1p.wrapping_add(hi), len);
            crate::arch::prefetch(c2p.wrapping_add(hi), len);
        }
        new_absmax
    };
    let sign_fix_codes = |_: usize, c1: &mut [u8], _: &mut [u8], s1: &[f32; B], _: &[f32; B]| {
        // The fix changes a code only where its side of 0 differs from the moment's sign. The
        // nearest code of a number never lies on the other side of 0, except code 127 (0.0: a
        // tiny negative moment, or -0) and NaN quotients (code 0), which need an absmax of 0
        // (0/0) or +inf (inf/inf). Blocks with neither skip the loop; the result is the same.
        let has_zero_code = c1.iter().fold(false, |any, &c| any | (c == 127));
        if has_zero_code || odd_absmax1.get() {
            for (c, &m) in c1.iter_mut().zip(s1) {
                *c = sign_fix(*c, m);
            }
        }
    };
    // The active implementation (every one gives the same codes; `QLORA_FORCE_SCALAR=1` selects
    // the scalar one, as for this crate's own loops).
    Implementation::active()
        .update_blockwise(
            [Encoder::signed(), Encoder::unsigned()],
            [128, 0],
            states,
            update,
            sign_fix_codes,
        )
        .expect("state lengths are checked by step_8bit");
}

/// Lanes of the running absmax reductions: one AVX-512 register (four SSE2 registers), so the
/// max-reduction vectorizes without reassociating anything observable (the maximum of a set of
/// non-NaN magnitudes does not depend on the order it is taken in).
const LANES: usize = 16;

/// The f32 update of one block (≤ 256 elements) from its dequantized old states `s1`, `s2` (256
/// lanes, padding included): they become the new moments, `p` is updated, and the new absmax
/// of both is returned.
///
/// Straight loops over 256-element buffers (the block stays in L1), without table lookups or
/// branches, so they vectorize: per lane the moment updates, the non-finite-gradient reset, the
/// running absmax (lane-wise maxima) and the parameter update, in one loop for a full block of
/// f32 or bf16 parameters (f16 parameters, whose rounding does not vectorize, and partial blocks
/// update in a second loop). Padding lanes (past `p.len()`) have g = 0 and count for the absmax
/// like any other lane, as in the kernel.
#[inline(always)]
pub(crate) fn block_update<P: Element, G: Element>(
    p: &mut [P],
    g: &[G],
    s1: &mut [f32; OPTIMIZER_BLOCKSIZE],
    s2: &mut [f32; OPTIMIZER_BLOCKSIZE],
    gbuf: &mut [f32; OPTIMIZER_BLOCKSIZE],
    k: &Consts,
) -> [f32; 2] {
    let n = p.len();
    // A whole block of f32 gradients is read in place; others are widened into `gbuf`, with the
    // padding lanes' g = 0.
    let gf: &[f32; OPTIMIZER_BLOCKSIZE] =
        match G::as_f32_slice(g).map(<&[f32; OPTIMIZER_BLOCKSIZE]>::try_from) {
            Some(Ok(whole)) => whole,
            _ => {
                for (o, g) in gbuf.iter_mut().zip(g) {
                    *o = g.to_f32();
                }
                gbuf[n..].fill(0.0);
                gbuf
            }
        };
    let (new1, new2) = match <&mut [P; OPTIMIZER_BLOCKSIZE]>::try_from(&mut *p) {
        Ok(pf) if P::DTYPE != Dtype::F16 => match k.decay {
            Some(decay) => lanes::<P, true, true>(Some(pf), gf, s1, s2, k, decay),
            None => lanes::<P, true, false>(Some(pf), gf, s1, s2, k, 1.0),
        },
        _ => {
            let r = lanes::<P, false, false>(None, gf, s1, s2, k, 1.0);
            update_params(p, &s1[..n], &s2[..n], &gf[..n], k);
            r
        }
    };
    [new1, new2]
}

/// True for a finite gradient (false for ±inf and NaN).
#[inline(always)]
fn finite(g: f32) -> bool {
    g.abs() < f32::INFINITY
}

/// The moments of one lane from its dequantized old states; both 0 for a non-finite gradient.
#[inline(always)]
fn lane_moments(m: f32, v: f32, g: f32, k: &Consts) -> (f32, f32) {
    let gs = g * k.gnorm_scale;
    let v = v * k.beta2 + k.one_minus_beta2 * gs * gs;
    let m = m * k.beta1 + k.one_minus_beta1 * gs;
    // A non-finite gradient resets both moments of its element to 0.
    let ok = finite(g);
    (if ok { m } else { 0.0 }, if ok { v } else { 0.0 })
}

/// The updated parameter of one lane: `T(p + step_size · m / (sqrt(v) + c2·ε))`, then
/// `T(p · decay)` when `DECAY`.
#[inline(always)]
fn lane_param<P: Element, const DECAY: bool>(p: P, m: f32, v: f32, k: &Consts, decay: f32) -> P {
    let x = P::from_f32(p.to_f32() + k.step_size * (m / (v.sqrt() + k.c2_eps)));
    if DECAY {
        P::from_f32(x.to_f32() * decay)
    } else {
        x
    }
}

/// The lane loop of one full 256-lane block: `s1`, `s2` (the dequantized old states) become the
/// new moments, the new absmax of both is returned, and with `PARAMS` the parameters `p` are
/// updated in the same loop (lanes with a non-finite gradient keep theirs).
#[inline(always)]
fn lanes<P: Element, const PARAMS: bool, const DECAY: bool>(
    mut p: Option<&mut [P; OPTIMIZER_BLOCKSIZE]>,
    g: &[f32; OPTIMIZER_BLOCKSIZE],
    s1: &mut [f32; OPTIMIZER_BLOCKSIZE],
    s2: &mut [f32; OPTIMIZER_BLOCKSIZE],
    k: &Consts,
    decay: f32,
) -> (f32, f32) {
    // cub's reduction starts from -FLT_MAX; fmaxf (like f32::max) skips NaN. `a > acc` is false
    // for a NaN `a`, so one compare-select per lane has fmaxf's semantics and keeps every
    // accumulator non-NaN.
    let mut acc1 = [f32::MIN; LANES];
    let mut acc2 = [f32::MIN; LANES];
    for (c, ((m, v), g)) in s1
        .chunks_exact_mut(LANES)
        .zip(s2.chunks_exact_mut(LANES))
        .zip(g.chunks_exact(LANES))
        .enumerate()
    {
        for l in 0..LANES {
            let gv = g[l];
            let (mm, vv) = lane_moments(m[l], v[l], gv, k);
            m[l] = mm;
            v[l] = vv;
            let (am, av) = (mm.abs(), vv.abs());
            acc1[l] = if am > acc1[l] { am } else { acc1[l] };
            acc2[l] = if av > acc2[l] { av } else { acc2[l] };
            if PARAMS {
                if let Some(p) = p.as_deref_mut() {
                    let old = p[c * LANES + l];
                    let x = lane_param::<P, DECAY>(old, mm, vv, k, decay);
                    p[c * LANES + l] = if finite(gv) { x } else { old };
                }
            }
        }
    }
    let max = |acc: [f32; LANES]| {
        acc.into_iter()
            .fold(f32::MIN, |a, x| if x > a { x } else { a })
    };
    (max(acc1), max(acc2))
}

/// The parameter update of the first `p.len()` lanes (lanes with a non-finite gradient keep
/// their parameter), after [`lanes`] without `PARAMS`.
#[inline(always)]
fn update_params<P: Element>(p: &mut [P], s1: &[f32], s2: &[f32], g: &[f32], k: &Consts) {
    #[inline(always)]
    fn run<P: Element, const DECAY: bool>(
        p: &mut [P],
        s1: &[f32],
        s2: &[f32],
        g: &[f32],
        k: &Consts,
        decay: f32,
    ) {
        for (((p, &m), &v), g) in p.iter_mut().zip(s1).zip(s2).zip(g) {
            let x = lane_param::<P, DECAY>(*p, m, v, k, decay);
            *p = if finite(*g) { x } else { *p };
        }
    }
    match k.decay {
        Some(decay) => run::<P, true>(p, s1, s2, g, k, decay),
        None => run::<P, false>(p, s1, s2, g, k, 1.0),
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
///
/// Runs [`Implementation::active`]; every implementation gives the same bits.
pub fn adam_step_32bit<P: Element, G: Element>(
    params: &mut [P],
    grads: &[G],
    state1: &mut [f32],
    state2: &mut [f32],
    hp: &AdamStep,
) -> Result<(), Error> {
    Implementation::active().adam_step_32bit(params, grads, state1, state2, hp)
}

fn step_32bit<P: Element, G: Element>(
    imp: Implementation,
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
    if n >= PARALLEL_THRESHOLD {
        params
            .par_chunks_mut(TASK_ELEMS)
            .zip(grads.par_chunks(TASK_ELEMS))
            .zip(state1.par_chunks_mut(TASK_ELEMS))
            .zip(state2.par_chunks_mut(TASK_ELEMS))
            .for_each(|(((p, g), s1), s2)| {
                crate::arch::run_32bit(imp, Task32 { p, g, s1, s2 }, &k);
            });
    } else {
        let t = Task32 {
            p: params,
            g: grads,
            s1: state1,
            s2: state2,
        };
        crate::arch::run_32bit(imp, t, &k);
    }
    Ok(())
}

/// A run of one 32-bit update (lengths checked by the caller: all four equally long).
pub(crate) struct Task32<'t, P, G> {
    pub(crate) p: &'t mut [P],
    pub(crate) g: &'t [G],
    pub(crate) s1: &'t mut [f32],
    pub(crate) s2: &'t mut [f32],
}

/// The 32-bit update of one task: one branch-free loop per decay setting, so it vectorizes.
/// Inlined into each `crate::arch` copy.
#[inline(always)]
pub(crate) fn task_32bit<P: Element, G: Element>(t: Task32<'_, P, G>, k: &Consts) {
    let lanes = t.p.iter_mut().zip(t.g).zip(t.s1).zip(t.s2);
    // The kernel scales g in its own type T (`g_vals[j] = gnorm_scale * (float)g_vals[j]`).
    let update = |p: &mut P, g: &G, s1: &mut f32, s2: &mut f32| {
        let gv = G::from_f32(k.gnorm_scale * g.to_f32()).to_f32();
        *s1 = *s1 * k.beta1 + k.one_minus_beta1 * gv;
        *s2 = *s2 * k.beta2 + k.one_minus_beta2 * (gv * gv);
        P::from_f32(p.to_f32() + k.step_size * (*s1 / (s2.sqrt() + k.c2_eps)))
    };
    match k.decay {
        Some(decay) => {
            for (((p, g), s1), s2) in lanes {
                let x = update(p, g, s1, s2);
                *p = P::from_f32(x.to_f32() * decay);
            }
        }
        None => {
            for (((p, g), s1), s2) in lanes {
                *p = update(p, g, s1, s2);
            }
        }
    }
}

/// The update kernels run with a chosen [`Implementation`] (the workspace's one run-time choice,
/// shared with `qlora-double-quant` and `qlora-codec`): the same safe Rust loops compiled for the
/// target's baseline instruction set ([`Implementation::Scalar`], and [`Implementation::Neon`],
/// aarch64's baseline), or for AVX2 / AVX-512.
///
/// [`Implementation::active`] is what [`adam_step_8bit`] and [`adam_step_32bit`] (and so the
/// optimizers) use; tests and benchmarks can run a specific one. Every implementation runs the
/// same operations in the same order with IEEE f32 arithmetic (no FMA contraction, exact division
/// and square root), so they give the same bits. Implemented for [`Implementation`] (the trait
/// exists because the type is `qlora-double-quant`'s).
///
/// ```
/// use qlora_optim::{AdamKernels, AdamStep, Implementation};
///
/// let hp = AdamStep {
///     lr: 1e-3,
///     beta1: 0.9,
///     beta2: 0.999,
///     eps: 1e-8,
///     weight_decay: 0.0,
///     step: 1,
///     gnorm_scale: 1.0,
/// };
/// let g = [0.5f32, -0.25, 1.0];
/// let mut want = [1.0f32; 3];
/// let (mut m, mut v) = ([0f32; 3], [0f32; 3]);
/// Implementation::Scalar.adam_step_32bit(&mut want, &g, &mut m, &mut v, &hp)?;
/// for imp in Implementation::available() {
///     let mut p = [1.0f32; 3];
///     let (mut m, mut v) = ([0f32; 3], [0f32; 3]);
///     imp.adam_step_32bit(&mut p, &g, &mut m, &mut v, &hp)?;
///     assert_eq!(p.map(f32::to_bits), want.map(f32::to_bits), "{imp}");
/// }
/// # Ok::<(), qlora_optim::Error>(())
/// ```
pub trait AdamKernels: Copy + Into<Implementation> {
    /// [`adam_step_8bit`] with this implementation.
    ///
    /// Errors like [`adam_step_8bit`], and with [`Error::Unavailable`] when this implementation
    /// is not [available](Implementation::is_available) here.
    fn adam_step_8bit<P: Element, G: Element>(
        self,
        params: &mut [P],
        grads: &[G],
        state: Blockwise8bitMut<'_>,
        hp: &AdamStep,
    ) -> Result<(), Error> {
        let imp = self.into();
        check_available(imp)?;
        step_8bit(imp, params, grads, state, hp)
    }

    /// [`adam_step_32bit`] with this implementation.
    ///
    /// Errors like [`adam_step_32bit`], and with [`Error::Unavailable`] when this implementation
    /// is not [available](Implementation::is_available) here.
    fn adam_step_32bit<P: Element, G: Element>(
        self,
        params: &mut [P],
        grads: &[G],
        state1: &mut [f32],
        state2: &mut [f32],
        hp: &AdamStep,
    ) -> Result<(), Error> {
        let imp = self.into();
        check_available(imp)?;
        step_32bit(imp, params, grads, state1, state2, hp)
    }
}

impl AdamKernels for Implementation {}

/// `Ok` when `imp` can run here, else [`Error::Unavailable`].
fn check_available(imp: Implementation) -> Result<(), Error> {
    if imp.is_available() {
        Ok(())
    } else {
        Err(Error::Unavailable(imp.name()))
    }
}
