//! The 8-bit and 32-bit kernels against a small, independent model of bitsandbytes' CUDA rule:
//! one thread per element as in `kOptimizerStatic8bit2StateBlockwise<T, ADAM, 256, 1>`, the
//! `quantize_2D` binary search with its quadrant pre-step transliterated here, f32 arithmetic in
//! the kernel's order. Codes and absmax must be equal, parameters bit-equal.

use half::{bf16, f16};
use qlora_double_quant::DynamicMap;
use qlora_optim::{
    adam_step_32bit, adam_step_8bit, AdamStep, Blockwise8bitMut, Element, OPTIMIZER_BLOCKSIZE,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `quantize_2D<SIGNED>` as written in the kernel (quadrants = code[63], code[127], code[191]).
fn quantize_2d(code: &[f32; 256], signed: bool, x: f32) -> u8 {
    let quadrants = [code[63], code[127], code[191]];
    let mut pivot: i32 = 127;
    let mut upper_pivot: i32 = 255;
    let mut lower_pivot: i32 = 0;
    let mut lower = if signed { -1.0f32 } else { 0.0 };
    let mut upper = 1.0f32;
    let mut val = quadrants[1];
    let mut local_pivot: i32 = 1;
    let mut offset: i32 = 1;
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
            local_pivot += offset;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
            local_pivot -= offset;
        }
        val = if i >= 64 {
            quadrants[local_pivot as usize]
        } else {
            code[pivot as usize]
        };
        offset -= 1;
        i >>= 1;
    }
    let r = if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot
        } else {
            pivot
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot
        } else {
            pivot
        }
    };
    r as u8
}

struct Scalars {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    step: i32,
    gnorm_scale: f32,
}

/// The 8-bit kernel, one "thread" per lane of each 256-lane block.
#[allow(clippy::too_many_arguments)]
fn model_8bit<T: Element>(
    p: &mut [T],
    g: &[T],
    state1: &mut [u8],
    state2: &mut [u8],
    absmax1: &mut [f32],
    absmax2: &mut [f32],
    k: &Scalars,
) {
    let q1 = DynamicMap::signed().values();
    let q2 = DynamicMap::unsigned().values();
    let n = p.len();
    let correction1 = 1.0f32 - k.beta1.powf(k.step as f32);
    let correction2 = (1.0f32 - k.beta2.powf(k.step as f32)).sqrt();
    let step_size = (-k.lr * correction2) / correction1;
    for (blk, base) in (0..n).step_by(256).enumerate() {
        let valid = (n - base).min(256);
        let mut g_vals = [0.0f32; 256];
        let mut c1s = [128u8; 256];
        let mut c2s = [0u8; 256];
        for j in 0..valid {
            g_vals[j] = g[base + j].to_f32();
            c1s[j] = state1[base + j];
            c2s[j] = state2[base + j];
        }
        let mut s1 = [0.0f32; 256];
        let mut s2 = [0.0f32; 256];
        let mut m1 = -f32::MAX;
        let mut m2 = -f32::MAX;
        for j in 0..256 {
            if g_vals[j].is_finite() {
                let gv = g_vals[j] * k.gnorm_scale;
                s2[j] = q2[c2s[j] as usize] * absmax2[blk];
                s2[j] = (s2[j] * k.beta2) + ((1.0 - k.beta2) * gv * gv);
                s1[j] = q1[c1s[j] as usize] * absmax1[blk];
                s1[j] = (s1[j] * k.beta1) + ((1.0 - k.beta1) * gv);
            } else {
                s1[j] = 0.0;
                s2[j] = 0.0;
            }
            m1 = m1.max(s1[j].abs());
            m2 = m2.max(s2[j].abs());
        }
        absmax1[blk] = m1;
        absmax2[blk] = m2;
        for j in 0..valid {
            if g_vals[j].is_finite() {
                let mut pv = T::from_f32(
                    p[base + j].to_f32()
                        + (step_size * (s1[j] / (s2[j].sqrt() + (correction2 * k.eps)))),
                );
                if k.wd > 0.0 {
                    pv = T::from_f32(pv.to_f32() * (1.0 - (k.lr * k.wd)));
                }
                p[base + j] = pv;
            }
        }
        for j in 0..valid {
            let mut c1 = quantize_2d(q1, true, s1[j] / m1);
            let c2 = quantize_2d(q2, false, s2[j] / m2);
            if q1[c1 as usize].is_sign_negative() != s1[j].is_sign_negative() {
                if s1[j] > 0.0 {
                    c1 = c1.wrapping_add(1);
                } else {
                    c1 = c1.wrapping_sub(1);
                }
            }
            state1[base + j] = c1;
            state2[base + j] = c2;
        }
    }
}

fn model_32bit<T: Element>(p: &mut [T], g: &[T], s1: &mut [f32], s2: &mut [f32], k: &Scalars) {
    let correction1 = 1.0f32 - k.beta1.powf(k.step as f32);
    let correction2 = (1.0f32 - k.beta2.powf(k.step as f32)).sqrt();
    let step_size = -k.lr * correction2 / correction1;
    for j in 0..p.len() {
        let gv = T::from_f32(k.gnorm_scale * g[j].to_f32()).to_f32();
        s1[j] = s1[j] * k.beta1 + ((1.0 - k.beta1) * gv);
        s2[j] = s2[j] * k.beta2 + ((1.0 - k.beta2) * (gv * gv));
        let mut pv = T::from_f32(
            p[j].to_f32() + (1.0 * step_size * (s1[j] / (s2[j].sqrt() + (k.eps * correction2)))),
        );
        if k.wd > 0.0 {
            pv = T::from_f32(pv.to_f32() * (1.0 - (k.lr * k.wd)));
        }
        p[j] = pv;
    }
}

/// Gradients over 12 decades with exact zeros, a zero block, and (optionally) NaN/inf.
fn gradients(rng: &mut ChaCha8Rng, n: usize, step: usize, non_finite: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            if (512..768).contains(&i) && step % 3 == 2 {
                return 0.0;
            }
            let r: f32 = rng.random();
            if r < 0.05 {
                0.0
            } else if non_finite && r < 0.06 {
                [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3]
            } else {
                let e: f32 = rng.random_range(-9.0f32..3.0);
                let s: f32 = rng.random_range(-1.0f32..1.0);
                s * 10f32.powf(e)
            }
        })
        .collect()
}

fn scalars(step: i32, wd: f32, gnorm_scale: f32) -> Scalars {
    Scalars {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        wd,
        step,
        gnorm_scale,
    }
}

fn hp(k: &Scalars) -> AdamStep {
    AdamStep {
        lr: k.lr,
        beta1: k.beta1,
        beta2: k.beta2,
        eps: k.eps,
        weight_decay: k.wd,
        step: k.step as u32,
        gnorm_scale: k.gnorm_scale,
    }
}

fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

fn run_8bit<T: Element>(n: usize, steps: i32, wd: f32, non_finite: bool, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let nb = n.div_ceil(OPTIMIZER_BLOCKSIZE);
    let p0: Vec<T> = (0..n)
        .map(|_| T::from_f32(rng.random_range(-0.5f32..0.5)))
        .collect();
    let (mut p_a, mut p_b) = (p0.clone(), p0);
    let (mut c1a, mut c2a, mut a1a, mut a2a) =
        (vec![0u8; n], vec![0u8; n], vec![0.0; nb], vec![0.0; nb]);
    let (mut c1b, mut c2b, mut a1b, mut a2b) =
        (vec![0u8; n], vec![0u8; n], vec![0.0; nb], vec![0.0; nb]);
    for t in 1..=steps {
        let g: Vec<T> = gradients(&mut rng, n, t as usize, non_finite)
            .into_iter()
            .map(T::from_f32)
            .collect();
        let k = scalars(t, wd, if t == 2 { 0.25 } else { 1.0 });
        adam_step_8bit(
            &mut p_a,
            &g,
            Blockwise8bitMut {
                state1: &mut c1a,
                state2: &mut c2a,
                absmax1: &mut a1a,
                absmax2: &mut a2a,
            },
            &hp(&k),
        )
        .unwrap();
        model_8bit(&mut p_b, &g, &mut c1b, &mut c2b, &mut a1b, &mut a2b, &k);
        assert_eq!(c1a, c1b, "state1 codes, n={n}, step {t}");
        assert_eq!(c2a, c2b, "state2 codes, n={n}, step {t}");
        assert_eq!(bits(&a1a), bits(&a1b), "absmax1, n={n}, step {t}");
        assert_eq!(bits(&a2a), bits(&a2b), "absmax2, n={n}, step {t}");
        assert_eq!(bits(&p_a), bits(&p_b), "params, n={n}, step {t}");
    }
}

#[test]
fn eight_bit_f32_equals_the_cuda_rule_model() {
    // Full blocks, a tail block, and sizes on the parallel path (with and without a tail).
    for (i, &n) in [256usize, 1000, 4500, 40_000, 65_536 + 77]
        .iter()
        .enumerate()
    {
        run_8bit::<f32>(n, 6, 1e-2, true, i as u64);
        run_8bit::<f32>(n, 3, 0.0, false, 100 + i as u64);
    }
}

#[test]
fn eight_bit_bf16_and_f16_equal_the_cuda_rule_model() {
    run_8bit::<bf16>(4500, 5, 1e-2, true, 7);
    run_8bit::<bf16>(40_000, 3, 0.1, false, 8);
    run_8bit::<f16>(4500, 5, 1e-2, true, 9);
}

fn run_32bit<T: Element>(n: usize, steps: i32, wd: f32, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let p0: Vec<T> = (0..n)
        .map(|_| T::from_f32(rng.random_range(-0.5f32..0.5)))
        .collect();
    let (mut p_a, mut p_b) = (p0.clone(), p0);
    let (mut s1a, mut s2a) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut s1b, mut s2b) = (vec![0.0f32; n], vec![0.0f32; n]);
    for t in 1..=steps {
        let g: Vec<T> = gradients(&mut rng, n, t as usize, false)
            .into_iter()
            .map(T::from_f32)
            .collect();
        let k = scalars(t, wd, if t == 2 { 0.3 } else { 1.0 });
        adam_step_32bit(&mut p_a, &g, &mut s1a, &mut s2a, &hp(&k)).unwrap();
        model_32bit(&mut p_b, &g, &mut s1b, &mut s2b, &k);
        assert_eq!(bits(&s1a), bits(&s1b), "state1, step {t}");
        assert_eq!(bits(&s2a), bits(&s2b), "state2, step {t}");
        assert_eq!(bits(&p_a), bits(&p_b), "params, step {t}");
    }
}

#[test]
fn thirty_two_bit_equals_the_cuda_rule_model() {
    run_32bit::<f32>(1000, 5, 1e-2, 1);
    run_32bit::<f32>(70_001, 3, 0.0, 2);
    run_32bit::<bf16>(5000, 4, 0.1, 3);
    run_32bit::<f16>(5000, 4, 1e-2, 4);
}

#[test]
fn quantize_2d_model_equals_the_double_quant_encoder() {
    // The model's search and the workspace codec agree (so the model is a valid oracle).
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (map, signed) in [
        (DynamicMap::signed(), true),
        (DynamicMap::unsigned(), false),
    ] {
        let code = map.values();
        for k in 0..255 {
            let m = (code[k] + code[k + 1]) * 0.5;
            for x in [
                m,
                code[k],
                f32::from_bits(m.to_bits() + 1),
                f32::from_bits(m.to_bits() - 1),
            ] {
                assert_eq!(quantize_2d(code, signed, x), map.encode(x), "x = {x:e}");
            }
        }
        for _ in 0..100_000 {
            let x: f32 = if signed {
                rng.random_range(-1.0f32..1.0)
            } else {
                rng.random_range(0.0f32..1.0)
            } * 10f32.powf(-rng.random_range(0.0f32..8.0));
            assert_eq!(quantize_2d(code, signed, x), map.encode(x), "x = {x:e}");
        }
    }
}

#[test]
fn all_zero_block_gives_codes_255_and_0() {
    // s1 = +0, absmax 0: 0/0 = NaN encodes to 0, and the sign fix moves -0.99 (code 0) to 255.
    let n = 512;
    let mut p = vec![1.0f32; n];
    let g = vec![0.0f32; n];
    let (mut c1, mut c2, mut a1, mut a2) = (vec![0u8; n], vec![0u8; n], vec![0.0; 2], vec![0.0; 2]);
    let k = scalars(1, 1e-2, 1.0);
    adam_step_8bit(
        &mut p,
        &g,
        Blockwise8bitMut {
            state1: &mut c1,
            state2: &mut c2,
            absmax1: &mut a1,
            absmax2: &mut a2,
        },
        &hp(&k),
    )
    .unwrap();
    assert!(c1.iter().all(|&c| c == 255));
    assert!(c2.iter().all(|&c| c == 0));
    assert_eq!(a1, vec![0.0, 0.0]);
    // p: step of 0/(0 + c2·eps) = 0, then the decay.
    assert!(p.iter().all(|&x| x == 1.0f32 * (1.0 - 3e-3f32 * 1e-2)));
}

#[test]
fn sign_fix_moves_tiny_negative_first_moments_off_zero() {
    // One large and one tiny negative gradient in a block: the tiny m/absmax is nearest to code
    // 127 (0.0), and the kernel moves it to 126 so it stays negative.
    let n = 256;
    let mut p = vec![0.0f32; n];
    let mut g = vec![0.0f32; n];
    g[0] = 1.0;
    g[1] = -1e-9;
    let (mut c1, mut c2, mut a1, mut a2) = (vec![0u8; n], vec![0u8; n], vec![0.0; 1], vec![0.0; 1]);
    adam_step_8bit(
        &mut p,
        &g,
        Blockwise8bitMut {
            state1: &mut c1,
            state2: &mut c2,
            absmax1: &mut a1,
            absmax2: &mut a2,
        },
        &hp(&scalars(1, 0.0, 1.0)),
    )
    .unwrap();
    assert_eq!(c1[0], 255);
    assert_eq!(c1[1], 126);
    assert_eq!(DynamicMap::signed().encode(-1e-9), 127);
}

#[test]
fn tail_block_padding_lanes_count_in_absmax1() {
    // Block 1 of a 300-element tensor holds 44 elements, all at code 127 (0.0) with a large old
    // absmax and zero gradients: only the padding lanes (code 128) give a non-zero new absmax1.
    let n = 300;
    let mut p = vec![0.0f32; n];
    let g = vec![0.0f32; n];
    let mut c1 = vec![127u8; n];
    let mut c2 = vec![0u8; n];
    let mut a1 = vec![0.0f32, 1000.0];
    let mut a2 = vec![0.0f32, 5.0];
    let k = scalars(4, 0.0, 1.0);
    adam_step_8bit(
        &mut p,
        &g,
        Blockwise8bitMut {
            state1: &mut c1,
            state2: &mut c2,
            absmax1: &mut a1,
            absmax2: &mut a2,
        },
        &hp(&k),
    )
    .unwrap();
    let q128 = DynamicMap::signed().decode(128);
    assert_eq!(q128 as f64, 5.500000384017767e-07);
    let expected = (q128 * 1000.0f32) * 0.9f32 + (1.0 - 0.9f32) * 0.0;
    assert_eq!(a1[1].to_bits(), expected.to_bits());
    assert!(a1[1] > 0.0);
    assert_eq!(a2[1], 0.0);
    // The stored lanes: s1 = 0 → code of 0/absmax = 0 → index 127.
    assert!(c1[256..].iter().all(|&c| c == 127));
}

#[test]
fn non_finite_gradients_reset_the_state_and_keep_the_parameter() {
    let n = 256;
    let mut p = vec![0.25f32; n];
    let mut g = vec![0.01f32; n];
    g[3] = f32::NAN;
    g[4] = f32::INFINITY;
    let (mut c1, mut c2, mut a1, mut a2) =
        (vec![200u8; n], vec![200u8; n], vec![1.0; 1], vec![1.0; 1]);
    adam_step_8bit(
        &mut p,
        &g,
        Blockwise8bitMut {
            state1: &mut c1,
            state2: &mut c2,
            absmax1: &mut a1,
            absmax2: &mut a2,
        },
        &hp(&scalars(2, 1e-2, 1.0)),
    )
    .unwrap();
    assert_eq!((p[3], p[4]), (0.25, 0.25));
    assert!(p[5] != 0.25);
    assert_eq!((c1[3], c2[3]), (127, 0));
    assert_eq!((c1[4], c2[4]), (127, 0));
}
