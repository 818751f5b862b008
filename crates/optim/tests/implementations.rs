//! Every kernel implementation this machine has ([`Implementation::available`]: the baseline
//! build and its AVX2 / AVX-512 copies) against a slow, straightforward per-element formulation
//! of the same rule, written here without the kernel's buffers, passes or lane-wise maxima: one
//! element at a time, table lookups for decoding, the binary-search encoder
//! ([`DynamicMap::encode`]) for encoding.
//!
//! Inputs are chosen to reach every branch of the rule: random codes and absmax (including 0 and
//! ∞), all-zero states, zero-gradient blocks, NaN/±∞ gradients, gradients whose square
//! overflows, partial last blocks of many lengths, every parameter × gradient dtype, weight decay
//! on and off, and sizes on both sides of the parallel threshold. Codes and absmax must be equal,
//! parameters bit-equal (any NaN counts as equal to any NaN).

use half::{bf16, f16};
use qlora_double_quant::DynamicMap;
use qlora_optim::{
    AdamKernels, AdamStep, Blockwise8bitMut, Element, Implementation, OPTIMIZER_BLOCKSIZE,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: usize = OPTIMIZER_BLOCKSIZE;

/// The fused 8-bit update, element by element.
#[allow(clippy::too_many_arguments)]
fn reference_8bit<P: Element, G: Element>(
    p: &mut [P],
    g: &[G],
    c1: &mut [u8],
    c2: &mut [u8],
    a1: &mut [f32],
    a2: &mut [f32],
    hp: &AdamStep,
) {
    let map1 = DynamicMap::signed();
    let map2 = DynamicMap::unsigned();
    let t = hp.step as f32;
    let correction1 = 1.0f32 - hp.beta1.powf(t);
    let correction2 = (1.0f32 - hp.beta2.powf(t)).sqrt();
    let step_size = (-hp.lr * correction2) / correction1;
    let n = p.len();
    for blk in 0..n.div_ceil(B) {
        let lo = blk * B;
        let hi = (lo + B).min(n);
        let (old1, old2) = (a1[blk], a2[blk]);
        let mut s1 = vec![0.0f32; hi - lo];
        let mut s2 = vec![0.0f32; hi - lo];
        let mut max1 = -f32::MAX;
        let mut max2 = -f32::MAX;
        for i in lo..hi {
            let gv = g[i].to_f32();
            let (m, v) = if gv.is_finite() {
                let gs = gv * hp.gnorm_scale;
                let v = map2.decode(c2[i]) * old2;
                let v = v * hp.beta2 + (1.0 - hp.beta2) * gs * gs;
                let m = map1.decode(c1[i]) * old1;
                let m = m * hp.beta1 + (1.0 - hp.beta1) * gs;
                (m, v)
            } else {
                (0.0, 0.0)
            };
            s1[i - lo] = m;
            s2[i - lo] = v;
            max1 = max1.max(m.abs());
            max2 = max2.max(v.abs());
        }
        // The padding lanes of a partial block: g = 0, state1 code 128, state2 code 0.
        for _ in hi - lo..B {
            let gs = 0.0f32 * hp.gnorm_scale;
            let m = map1.decode(128) * old1 * hp.beta1 + (1.0 - hp.beta1) * gs;
            let v = map2.decode(0) * old2 * hp.beta2 + (1.0 - hp.beta2) * gs * gs;
            max1 = max1.max(m.abs());
            max2 = max2.max(v.abs());
        }
        a1[blk] = max1;
        a2[blk] = max2;
        for i in lo..hi {
            let (m, v) = (s1[i - lo], s2[i - lo]);
            if g[i].to_f32().is_finite() {
                let x = p[i].to_f32() + step_size * (m / (v.sqrt() + correction2 * hp.eps));
                let mut x = P::from_f32(x);
                if hp.weight_decay > 0.0 {
                    x = P::from_f32(x.to_f32() * (1.0 - hp.lr * hp.weight_decay));
                }
                p[i] = x;
            }
            let mut code1 = map1.encode(m / max1);
            if map1.decode(code1).is_sign_negative() != m.is_sign_negative() {
                code1 = if m > 0.0 {
                    code1.wrapping_add(1)
                } else {
                    code1.wrapping_sub(1)
                };
            }
            c1[i] = code1;
            c2[i] = map2.encode(v / max2);
        }
    }
}

/// The 32-bit update, element by element.
fn reference_32bit<P: Element, G: Element>(
    p: &mut [P],
    g: &[G],
    s1: &mut [f32],
    s2: &mut [f32],
    hp: &AdamStep,
) {
    let t = hp.step as f32;
    let correction1 = 1.0f32 - hp.beta1.powf(t);
    let correction2 = (1.0f32 - hp.beta2.powf(t)).sqrt();
    let step_size = (-hp.lr * correction2) / correction1;
    for i in 0..p.len() {
        let gv = G::from_f32(hp.gnorm_scale * g[i].to_f32()).to_f32();
        s1[i] = s1[i] * hp.beta1 + (1.0 - hp.beta1) * gv;
        s2[i] = s2[i] * hp.beta2 + (1.0 - hp.beta2) * (gv * gv);
        let mut x = P::from_f32(
            p[i].to_f32() + step_size * (s1[i] / (s2[i].sqrt() + hp.eps * correction2)),
        );
        if hp.weight_decay > 0.0 {
            x = P::from_f32(x.to_f32() * (1.0 - hp.lr * hp.weight_decay));
        }
        p[i] = x;
    }
}

/// f32 bits with every NaN mapped to one pattern.
fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter()
        .map(|x| {
            let x = x.to_f32();
            if x.is_nan() {
                u32::MAX
            } else {
                x.to_bits()
            }
        })
        .collect()
}

/// Gradients block by block, each block of one kind: ordinary values over 12 decades with
/// sprinkled zeros, all zero, with NaN/±∞, or with values whose square overflows f32.
fn gradients<G: Element>(rng: &mut ChaCha8Rng, n: usize) -> Vec<G> {
    let mut g = Vec::with_capacity(n);
    while g.len() < n {
        let kind = rng.random_range(0..8u32);
        for _ in 0..B.min(n - g.len()) {
            let r: f32 = rng.random();
            let ordinary =
                rng.random_range(-1.0f32..1.0) * 10f32.powf(rng.random_range(-9.0f32..3.0));
            let x = match kind {
                0 => 0.0,
                1 | 2 if r < 0.08 => [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][g.len() % 3],
                3 if r < 0.05 => rng.random_range(-1.0f32..1.0) * 1e25,
                _ if r < 0.05 => 0.0,
                _ => ordinary,
            };
            g.push(G::from_f32(x));
        }
    }
    g
}

/// 8-bit states block by block: random codes with a log-uniform absmax, all-zero states, a zero
/// absmax, an infinite absmax, or the states of a fresh parameter (codes 0, absmax 0).
fn states(rng: &mut ChaCha8Rng, n: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>, Vec<f32>) {
    let nb = n.div_ceil(B);
    let (mut c1, mut c2) = (vec![0u8; n], vec![0u8; n]);
    let (mut a1, mut a2) = (vec![0.0f32; nb], vec![0.0f32; nb]);
    for blk in 0..nb {
        let range = blk * B..((blk + 1) * B).min(n);
        let kind = rng.random_range(0..10u32);
        for i in range {
            (c1[i], c2[i]) = match kind {
                0 => (127, 0),
                1 => (0, 0),
                _ => (rng.random(), rng.random()),
            };
        }
        (a1[blk], a2[blk]) = match kind {
            1 => (0.0, 0.0),
            2 => (0.0, rng.random_range(0.0f32..1.0)),
            3 if blk % 2 == 1 => (f32::INFINITY, f32::INFINITY),
            _ => (
                10f32.powf(rng.random_range(-8.0f32..2.0)),
                10f32.powf(rng.random_range(-12.0f32..1.0)),
            ),
        };
    }
    (c1, c2, a1, a2)
}

fn hyper(step: u32, wd: f32, gnorm_scale: f32) -> AdamStep {
    AdamStep {
        lr: 2e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: wd,
        step,
        gnorm_scale,
    }
}

/// Sizes: tiny, partial last blocks of many lengths, and past the parallel threshold.
const SIZES: [usize; 11] = [
    1,
    17,
    100,
    255,
    256,
    257,
    511,
    640,
    1000,
    4096 + 129,
    40_000 + 3,
];

fn check_8bit<P: Element, G: Element>(seed: u64) {
    for imp in Implementation::available() {
        for (si, &n) in SIZES.iter().enumerate() {
            for wd in [0.0f32, 1e-2] {
                let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + si as u64);
                let p0: Vec<P> = (0..n)
                    .map(|_| P::from_f32(rng.random_range(-2.0f32..2.0)))
                    .collect();
                let (mut p_a, mut p_b) = (p0.clone(), p0);
                let (mut c1a, mut c2a, mut a1a, mut a2a) = states(&mut rng, n);
                let (mut c1b, mut c2b, mut a1b, mut a2b) =
                    (c1a.clone(), c2a.clone(), a1a.clone(), a2a.clone());
                for step in 1..=3u32 {
                    let g = gradients::<G>(&mut rng, n);
                    let hp = hyper(step, wd, [1.0, 0.3, -1.5][step as usize - 1]);
                    let what = format!(
                        "{imp}, P = {:?}, G = {:?}, n = {n}, wd = {wd}, step {step}",
                        P::DTYPE,
                        G::DTYPE
                    );
                    imp.adam_step_8bit(
                        &mut p_a,
                        &g,
                        Blockwise8bitMut {
                            state1: &mut c1a,
                            state2: &mut c2a,
                            absmax1: &mut a1a,
                            absmax2: &mut a2a,
                        },
                        &hp,
                    )
                    .unwrap();
                    reference_8bit(&mut p_b, &g, &mut c1b, &mut c2b, &mut a1b, &mut a2b, &hp);
                    assert_eq!(c1a, c1b, "state1 codes, {what}");
                    assert_eq!(c2a, c2b, "state2 codes, {what}");
                    assert_eq!(bits(&a1a), bits(&a1b), "absmax1, {what}");
                    assert_eq!(bits(&a2a), bits(&a2b), "absmax2, {what}");
                    assert_eq!(bits(&p_a), bits(&p_b), "params, {what}");
                }
            }
        }
    }
}

fn check_32bit<P: Element, G: Element>(seed: u64) {
    for imp in Implementation::available() {
        for (si, &n) in SIZES.iter().enumerate() {
            for wd in [0.0f32, 1e-2] {
                let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + si as u64);
                let p0: Vec<P> = (0..n)
                    .map(|_| P::from_f32(rng.random_range(-2.0f32..2.0)))
                    .collect();
                let (mut p_a, mut p_b) = (p0.clone(), p0);
                let (mut s1a, mut s2a) = (vec![0.0f32; n], vec![0.0f32; n]);
                let (mut s1b, mut s2b) = (s1a.clone(), s2a.clone());
                for step in 1..=3u32 {
                    let g = gradients::<G>(&mut rng, n);
                    let hp = hyper(step, wd, [1.0, 0.3, -1.5][step as usize - 1]);
                    let what = format!(
                        "{imp}, P = {:?}, G = {:?}, n = {n}, wd = {wd}, step {step}",
                        P::DTYPE,
                        G::DTYPE
                    );
                    imp.adam_step_32bit(&mut p_a, &g, &mut s1a, &mut s2a, &hp)
                        .unwrap();
                    reference_32bit(&mut p_b, &g, &mut s1b, &mut s2b, &hp);
                    assert_eq!(bits(&s1a), bits(&s1b), "state1, {what}");
                    assert_eq!(bits(&s2a), bits(&s2b), "state2, {what}");
                    assert_eq!(bits(&p_a), bits(&p_b), "params, {what}");
                }
            }
        }
    }
}

/// Runs `$check::<P, G>` for every parameter × gradient dtype.
macro_rules! every_dtype_pair {
    ($check:ident) => {
        $check::<f32, f32>(1);
        $check::<f32, bf16>(2);
        $check::<f32, f16>(3);
        $check::<bf16, f32>(4);
        $check::<bf16, bf16>(5);
        $check::<bf16, f16>(6);
        $check::<f16, f32>(7);
        $check::<f16, bf16>(8);
        $check::<f16, f16>(9);
    };
}

#[test]
fn eight_bit_implementations_equal_the_per_element_rule() {
    every_dtype_pair!(check_8bit);
}

#[test]
fn thirty_two_bit_implementations_equal_the_per_element_rule() {
    every_dtype_pair!(check_32bit);
}

#[test]
fn implementations_are_listed_best_first_and_scalar_always_runs() {
    let all = Implementation::available();
    assert_eq!(all.last(), Some(&Implementation::Scalar));
    assert_eq!(all.first(), Some(&Implementation::best()));
    assert!(all.contains(&Implementation::active()));
    for imp in all {
        assert!(imp.is_available());
    }
    // On x86-64, the wider copies are offered only where the CPU has every feature they are
    // compiled for (`qlora-double-quant`'s tests check the whole rule).
    #[cfg(target_arch = "x86_64")]
    {
        if Implementation::Avx2.is_available() {
            assert!(std::is_x86_feature_detected!("avx2"));
        }
        if Implementation::Avx512.is_available() {
            assert!(
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl")
            );
        }
        assert!(!Implementation::Neon.is_available());
    }
}

#[test]
fn an_unavailable_implementation_is_an_error_not_a_crash() {
    // Every implementation either runs or reports `Unavailable`; neither panics.
    let hp = hyper(1, 0.0, 1.0);
    for imp in [
        Implementation::Scalar,
        Implementation::Avx2,
        Implementation::Avx512,
        Implementation::Neon,
    ] {
        let (mut p, g) = (vec![0.5f32; 300], vec![0.1f32; 300]);
        let (mut c1, mut c2, mut a1, mut a2) = (vec![0u8; 300], vec![0u8; 300], [0.0; 2], [0.0; 2]);
        let r = imp.adam_step_8bit(
            &mut p,
            &g,
            Blockwise8bitMut {
                state1: &mut c1,
                state2: &mut c2,
                absmax1: &mut a1,
                absmax2: &mut a2,
            },
            &hp,
        );
        let (mut s1, mut s2) = (vec![0.0f32; 300], vec![0.0f32; 300]);
        let r32 = imp.adam_step_32bit(&mut p, &g, &mut s1, &mut s2, &hp);
        if imp.is_available() {
            assert!(r.is_ok() && r32.is_ok(), "{imp}");
            assert!(p[0] < 0.5, "{imp}");
        } else {
            assert!(
                matches!(r, Err(qlora_optim::Error::Unavailable(_))),
                "{imp}"
            );
            assert!(
                matches!(r32, Err(qlora_optim::Error::Unavailable(_))),
                "{imp}"
            );
            assert_eq!(p[0], 0.5, "{imp}");
        }
    }
}

#[test]
fn the_active_implementation_is_the_best_unless_scalar_is_forced() {
    let forced = std::env::var_os("QLORA_FORCE_SCALAR").is_some_and(|v| v == "1");
    let expected = if forced {
        Implementation::Scalar
    } else {
        Implementation::best()
    };
    assert_eq!(Implementation::active(), expected);
}
