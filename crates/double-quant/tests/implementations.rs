//! Every slice-kernel [`Implementation`] this machine can run against the oracle
//! [`DynamicMap::encode`] (the transliterated CUDA binary search) and the scalar product
//! `values[code] * scale`.

use proptest::prelude::*;
use qlora_double_quant::{BlockwiseStatesMut, DynamicMap, Encoder, Implementation};

fn maps() -> [(&'static DynamicMap, &'static Encoder); 2] {
    [
        (DynamicMap::signed(), Encoder::signed()),
        (DynamicMap::unsigned(), Encoder::unsigned()),
    ]
}

fn ulp(x: f32, d: i32) -> f32 {
    f32::from_bits(x.to_bits().wrapping_add_signed(d))
}

/// Codes, midpoints and their neighbours, and the special values, both signs.
fn probes(map: &DynamicMap) -> Vec<f32> {
    let v = map.values();
    let mut p = vec![
        0.0f32,
        f32::NAN,
        f32::from_bits(0x7fc0_1234), // a NaN with payload
        f32::from_bits(0x7f80_0001), // a signalling NaN
        f32::INFINITY,
        f32::MAX,
        1.0,
        ulp(1.0, 1),
        ulp(1.0, -1),
        1.5,
        2.0,
        1e30,
        f32::MIN_POSITIVE,
        ulp(f32::MIN_POSITIVE, -1), // the largest subnormal
        f32::from_bits(1),          // the smallest subnormal
        f32::from_bits(0x0004_0000),
        1e-30,
        1e-7,
    ];
    for k in 0..256 {
        let c = v[k];
        p.extend([c, ulp(c, 1), ulp(c, -1), ulp(c, 2), ulp(c, -2)]);
        if k < 255 {
            let m = (v[k] + v[k + 1]) * 0.5;
            p.extend([m, ulp(m, 1), ulp(m, -1), ulp(m, 2), ulp(m, -2)]);
        }
    }
    let neg: Vec<f32> = p.iter().map(|x| -x).collect();
    p.extend(neg);
    p
}

/// Every 4099th f32 bit pattern (all exponents, NaNs, infinities), plus every 127th pattern of
/// [-2, 2].
fn sweep() -> Vec<f32> {
    let mut x: Vec<f32> = (0..=u32::MAX).step_by(4099).map(f32::from_bits).collect();
    for sign in [0u32, 0x8000_0000] {
        x.extend(
            (0..=2.0f32.to_bits())
                .step_by(127)
                .map(|b| f32::from_bits(b | sign)),
        );
    }
    x
}

fn hex(x: f32) -> String {
    format!("{x:e} ({:#010x})", x.to_bits())
}

/// Runs all three slice encoders of `imp` on `x` and compares every code with the oracle.
fn check_encoders(imp: Implementation, map: &DynamicMap, enc: &Encoder, x: &[f32], p: f32) {
    let mut out = vec![0u8; x.len()];
    imp.encode_slice(enc, x, &mut out);
    for (i, (&v, &c)) in x.iter().zip(&out).enumerate() {
        assert_eq!(c, map.encode(v), "{imp} encode_slice [{i}] x = {}", hex(v));
    }
    imp.encode_scaled(enc, x, p, &mut out);
    for (i, (&v, &c)) in x.iter().zip(&out).enumerate() {
        assert_eq!(
            c,
            map.encode(v * p),
            "{imp} encode_scaled [{i}] x = {}, scale {}",
            hex(v),
            hex(p)
        );
    }
    imp.encode_divided(enc, x, p, &mut out);
    for (i, (&v, &c)) in x.iter().zip(&out).enumerate() {
        assert_eq!(
            c,
            map.encode(v / p),
            "{imp} encode_divided [{i}] x = {}, divisor {}",
            hex(v),
            hex(p)
        );
    }
}

const FACTORS: [f32; 9] = [
    1.0,
    0.5,
    3.0,
    -1.0,
    1.0 / 3.0,
    0.0,
    f32::INFINITY,
    f32::NAN,
    1e-3,
];

#[test]
fn all_implementations_are_listed() {
    let all = Implementation::available();
    assert_eq!(all.last(), Some(&Implementation::Scalar));
    assert!(all.contains(&Implementation::best()));
    assert!(all.contains(&Implementation::active()));
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        assert!(all.contains(&Implementation::Avx2), "{all:?}");
    }
    eprintln!("implementations tested: {all:?}");
}

#[test]
fn every_implementation_equals_the_binary_search_on_probes() {
    for imp in Implementation::available() {
        for (map, enc) in maps() {
            let x = probes(map);
            for p in FACTORS {
                check_encoders(imp, map, enc, &x, p);
            }
        }
    }
}

#[test]
fn every_implementation_equals_the_binary_search_on_a_bit_pattern_sweep() {
    let x = sweep();
    for (map, enc) in maps() {
        let oracle: Vec<u8> = x.iter().map(|&v| map.encode(v)).collect();
        let scaled: Vec<u8> = x.iter().map(|&v| map.encode(v * 0.75)).collect();
        let divided: Vec<u8> = x.iter().map(|&v| map.encode(v / 1.25)).collect();
        for imp in Implementation::available() {
            let mut out = vec![0u8; x.len()];
            imp.encode_slice(enc, &x, &mut out);
            for i in 0..x.len() {
                assert_eq!(out[i], oracle[i], "{imp} x = {}", hex(x[i]));
            }
            imp.encode_scaled(enc, &x, 0.75, &mut out);
            for i in 0..x.len() {
                assert_eq!(out[i], scaled[i], "{imp} scaled x = {}", hex(x[i]));
            }
            imp.encode_divided(enc, &x, 1.25, &mut out);
            for i in 0..x.len() {
                assert_eq!(out[i], divided[i], "{imp} divided x = {}", hex(x[i]));
            }
        }
    }
}

#[test]
fn lengths_and_unaligned_starts_write_exactly_their_range() {
    for (map, enc) in maps() {
        // Values that cover many codes and every special case, in a shuffled order.
        let pool: Vec<f32> = probes(map).into_iter().step_by(3).collect();
        for imp in Implementation::available() {
            for start in 0..17 {
                for len in 0..=70 {
                    let x = &pool[start * 5..start * 5 + len];
                    let mut buf = vec![0xA5u8; len + start + 9];
                    let out = &mut buf[start..];
                    imp.encode_scaled(enc, x, 0.5, out);
                    for (i, &v) in x.iter().enumerate() {
                        assert_eq!(out[i], map.encode(v * 0.5), "{imp} start {start} len {len}");
                    }
                    assert!(
                        buf[..start].iter().all(|&b| b == 0xA5),
                        "{imp} wrote before"
                    );
                    assert!(
                        buf[start + len..].iter().all(|&b| b == 0xA5),
                        "{imp} wrote past the input length (start {start}, len {len})"
                    );
                    let out = &mut buf[start..start + len];
                    imp.encode_slice(enc, x, out);
                    for (i, &v) in x.iter().enumerate() {
                        assert_eq!(out[i], map.encode(v), "{imp} start {start} len {len}");
                    }
                    imp.encode_divided(enc, x, 3.0, out);
                    for (i, &v) in x.iter().enumerate() {
                        assert_eq!(out[i], map.encode(v / 3.0), "{imp} start {start} len {len}");
                    }
                }
            }
        }
    }
}

/// `encode_divided` may take `x · (1/p)` instead of `x / p` where that cannot change the code:
/// values whose quotient lands on or a few ulps around every decision threshold, for divisors
/// whose reciprocal is inexact, a power of two, huge, tiny (`1/p` not normal: the division is
/// used throughout) or subnormal.
#[test]
fn encode_divided_is_exact_around_every_threshold() {
    let divisors = [
        0.37f32,
        1.0 / 3.0,
        3.0,
        0.999_999_94,
        1.000_000_1,
        7.0,
        2.0f32.powi(-20),
        0.015_625,
        1.234_567e-5,
        4.2e-37,
        3.3e37,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-39, // subnormal
        -0.71,
    ];
    for (map, enc) in maps() {
        let v = map.values();
        for &d in &divisors {
            let mut x = Vec::new();
            for k in 0..255 {
                let mid = (v[k] + v[k + 1]) * 0.5;
                for t in [mid, v[k]] {
                    let x0 = t * d;
                    for j in -6..=6 {
                        x.push(ulp(x0, j));
                    }
                }
            }
            for imp in Implementation::available() {
                let mut out = vec![0u8; x.len()];
                imp.encode_divided(enc, &x, d, &mut out);
                for (i, (&xv, &c)) in x.iter().zip(&out).enumerate() {
                    assert_eq!(
                        c,
                        map.encode(xv / d),
                        "{imp} encode_divided [{i}] x = {}, divisor {}",
                        hex(xv),
                        hex(d)
                    );
                }
            }
        }
    }
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn decode_scaled_equals_the_scalar_product() {
    let codes: Vec<u8> = (0..=255u8)
        .chain((0..=255u8).rev())
        .chain([7, 0, 255])
        .collect();
    for map in [DynamicMap::signed(), DynamicMap::unsigned()] {
        for imp in Implementation::available() {
            for scale in [
                1.0f32,
                0.037,
                -2.5,
                0.0,
                f32::INFINITY,
                f32::NAN,
                1e-40,
                3e38,
            ] {
                for start in 0..17 {
                    for len in (0..=70).chain([codes.len() - start]) {
                        let c = &codes[start..start + len];
                        let mut buf = vec![-7.0f32; len + start + 9];
                        imp.decode_scaled(map, c, scale, &mut buf[start..]);
                        for (i, &code) in c.iter().enumerate() {
                            let want = map.values()[code as usize] * scale;
                            let got = buf[start + i];
                            assert!(
                                same(got, want),
                                "{imp} code {code} × {scale}: {got} vs {want}"
                            );
                        }
                        assert!(buf[..start].iter().all(|&v| v == -7.0));
                        assert!(
                            buf[start + len..].iter().all(|&v| v == -7.0),
                            "{imp} len {len}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn methods_on_the_encoder_and_map_use_an_exact_implementation() {
    let x = sweep();
    for (map, enc) in maps() {
        let mut out = vec![0u8; x.len()];
        enc.encode_slice(&x, &mut out);
        assert!(x.iter().zip(&out).all(|(&v, &c)| c == map.encode(v)));
        enc.encode_scaled(&x, 0.3, &mut out);
        assert!(x.iter().zip(&out).all(|(&v, &c)| c == map.encode(v * 0.3)));
        enc.encode_divided(&x, 0.3, &mut out);
        assert!(x.iter().zip(&out).all(|(&v, &c)| c == map.encode(v / 0.3)));
        let codes: Vec<u8> = (0..1000).map(|i| (i * 37 % 256) as u8).collect();
        let mut back = vec![0f32; 1000];
        map.decode_scaled(&codes, 0.01, &mut back);
        for (&c, &b) in codes.iter().zip(&back) {
            assert_eq!(b.to_bits(), (map.decode(c) * 0.01).to_bits());
        }
    }
}

#[test]
#[should_panic(expected = "output shorter than input")]
fn short_output_panics() {
    let mut out = [0u8; 3];
    Encoder::signed().encode_scaled(&[0.0; 4], 1.0, &mut out);
}

/// NaN quotients take the vector path (code 0) instead of the one-by-one exact path; a block of
/// zeros divided by its zero absmax is all NaN.
#[test]
fn nan_quotients_and_zero_divisors_give_the_binary_search_codes() {
    let mut x = vec![0.0f32; 300];
    for (i, v) in x.iter_mut().enumerate().skip(200) {
        *v = match i % 5 {
            0 => f32::NAN,
            1 => -0.0,
            2 => 0.25,
            3 => -1e-30,
            _ => f32::INFINITY,
        };
    }
    for imp in Implementation::available() {
        for (map, enc) in maps() {
            for d in [0.0f32, -0.0, 1.0, f32::INFINITY, f32::NAN] {
                let mut out = vec![7u8; x.len()];
                imp.encode_divided(enc, &x, d, &mut out);
                for (i, (&v, &c)) in x.iter().zip(&out).enumerate() {
                    assert_eq!(c, map.encode(v / d), "{imp} [{i}] {v} / {d}");
                }
            }
        }
    }
}

/// The update of block `j` used by the `update_blockwise` tests: decay both states, add a
/// pseudo-random term (zero for every third block, so some blocks become all zero), return the
/// absmax of each.
fn test_update(j: usize, s1: &mut [f32; 256], s2: &mut [f32; 256]) -> [f32; 2] {
    let mut a = [0f32; 2];
    for (i, (m, v)) in s1.iter_mut().zip(s2.iter_mut()).enumerate() {
        let g = if j % 3 == 2 {
            0.0
        } else {
            ((i * 7919 + j * 104_729) % 2001) as f32 * 1e-4 - 0.1
        };
        *m = if j % 3 == 2 { 0.0 } else { *m * 0.9 + 0.1 * g };
        *v = if j % 3 == 2 {
            0.0
        } else {
            *v * 0.99 + 0.01 * g * g
        };
        a[0] = a[0].max(m.abs());
        a[1] = a[1].max(v.abs());
    }
    a
}

#[test]
fn update_blockwise_equals_a_per_element_reference_for_every_implementation() {
    let (e1, e2) = (Encoder::signed(), Encoder::unsigned());
    let (m1, m2) = (e1.map(), e2.map());
    for n in [0usize, 1, 255, 256, 300, 256 * 9 + 17] {
        let nb = n.div_ceil(256);
        let c1: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
        let c2: Vec<u8> = (0..n).map(|i| (i * 91 % 256) as u8).collect();
        let a1: Vec<f32> = (0..nb).map(|j| 0.01 * (j + 1) as f32).collect();
        let a2: Vec<f32> = (0..nb).map(|j| 0.001 * (j + 2) as f32).collect();
        // Reference: per element, with the binary-search encoder.
        let (mut r1, mut r2, mut ra1, mut ra2) = (c1.clone(), c2.clone(), a1.clone(), a2.clone());
        for j in 0..nb {
            let lo = 256 * j;
            let hi = (lo + 256).min(n);
            let mut s1 = [m1.decode(128) * ra1[j]; 256];
            let mut s2 = [m2.decode(0) * ra2[j]; 256];
            for i in lo..hi {
                s1[i - lo] = m1.decode(r1[i]) * ra1[j];
                s2[i - lo] = m2.decode(r2[i]) * ra2[j];
            }
            let [x1, x2] = test_update(j, &mut s1, &mut s2);
            for i in lo..hi {
                r1[i] = m1.encode(s1[i - lo] / x1);
                r2[i] = m2.encode(s2[i - lo] / x2);
                if i % 5 == 0 {
                    r1[i] = r1[i].wrapping_add(1);
                }
            }
            ra1[j] = x1;
            ra2[j] = x2;
        }
        for imp in Implementation::available() {
            let (mut o1, mut o2, mut oa1, mut oa2) =
                (c1.clone(), c2.clone(), a1.clone(), a2.clone());
            let states = BlockwiseStatesMut {
                state1: &mut o1,
                absmax1: &mut oa1,
                state2: &mut o2,
                absmax2: &mut oa2,
            };
            imp.update_blockwise(
                [e1, e2],
                [128, 0],
                states,
                test_update,
                |j, c1, c2, _, _| {
                    assert_eq!(c1.len(), c2.len());
                    for (k, c) in c1.iter_mut().enumerate() {
                        if (256 * j + k) % 5 == 0 {
                            *c = c.wrapping_add(1);
                        }
                    }
                },
            )
            .expect("consistent lengths");
            assert_eq!(o1, r1, "{imp} n = {n}: state1");
            assert_eq!(o2, r2, "{imp} n = {n}: state2");
            assert_eq!(oa1, ra1, "{imp} n = {n}: absmax1");
            assert_eq!(oa2, ra2, "{imp} n = {n}: absmax2");
        }
    }
}

#[test]
fn update_blockwise_rejects_inconsistent_lengths() {
    // (state2 length, absmax2 length, the buffer the error must name), for 300 elements.
    for (n2, nb2, what) in [(299, 2, "state2"), (300, 1, "absmax2")] {
        let (mut c1, mut c2) = (vec![0u8; 300], vec![0u8; n2]);
        let (mut a1, mut a2) = (vec![1f32; 2], vec![1f32; nb2]);
        let states = BlockwiseStatesMut {
            state1: &mut c1,
            absmax1: &mut a1,
            state2: &mut c2,
            absmax2: &mut a2,
        };
        let err = Implementation::best()
            .update_blockwise(
                [Encoder::signed(), Encoder::unsigned()],
                [128, 0],
                states,
                test_update,
                |_, _, _, _, _| {},
            )
            .unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
}

#[test]
#[should_panic(expected = "one divisor or scale per block")]
fn a_missing_block_divisor_panics() {
    let mut out = [0u8; 5];
    Encoder::signed().encode_blocks_divided(&[0.0; 5], 2, &[1.0, 1.0], &mut out);
}

#[test]
#[should_panic(expected = "one scale per block")]
fn an_extra_block_scale_panics() {
    let mut out = [0f32; 4];
    DynamicMap::unsigned().decode_blocks_scaled(&[0; 4], 2, &[1.0, 1.0, 1.0], &mut out);
}

#[test]
#[should_panic(expected = "block size 0")]
fn block_size_zero_panics() {
    let mut out = [0u8; 4];
    Encoder::signed().encode_blocks_scaled(&[0.0; 4], 0, &[], &mut out);
}

/// Block forms on optimizer-sized data: 256-element blocks with a wide range of divisors, the
/// last block partial, values spread over each block's `[-p, p]`.
#[test]
fn block_forms_equal_the_binary_search_on_optimizer_blocks() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let n: usize = 256 * 37 + 77;
    let blocks = n.div_ceil(256);
    let p: Vec<f32> = (0..blocks)
        .map(|j| 10f32.powi(j as i32 % 12 - 8) * (0.5 + next()))
        .collect();
    let x: Vec<f32> = (0..n)
        .map(|i| p[i / 256] * (2.0 * next() - 1.0) * next().powi(3))
        .collect();
    for imp in Implementation::available() {
        for (map, enc) in maps() {
            let mut codes = vec![0u8; n];
            imp.encode_blocks_divided(enc, &x, 256, &p, &mut codes);
            for (i, (&v, &c)) in x.iter().zip(&codes).enumerate() {
                assert_eq!(c, map.encode(v / p[i / 256]), "{imp} [{i}] x = {}", hex(v));
            }
            let mut back = vec![0f32; n];
            imp.decode_blocks_scaled(map, &codes, 256, &p, &mut back);
            for (i, (&c, &o)) in codes.iter().zip(&back).enumerate() {
                assert!(same(o, map.decode(c) * p[i / 256]), "{imp} [{i}]");
            }
        }
    }
}

#[test]
#[should_panic(expected = "output shorter than input")]
fn short_output_panics_for_every_implementation() {
    let imp = Implementation::best();
    let mut out = [0f32; 3];
    imp.decode_scaled(DynamicMap::signed(), &[0; 4], 1.0, &mut out);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn slice_encoders_equal_the_binary_search(
        raw in prop::collection::vec(any::<f32>(), 0..80),
        unit in prop::collection::vec(-1.0f32..=1.0, 0..80),
        p in prop_oneof![any::<f32>(), 0.5f32..4.0],
        start in 0usize..8,
    ) {
        for x in [&raw, &unit] {
            let x = &x[start.min(x.len())..];
            for imp in Implementation::available() {
                for (map, enc) in maps() {
                    let mut out = vec![0u8; x.len()];
                    imp.encode_slice(enc, x, &mut out);
                    for (&v, &c) in x.iter().zip(&out) {
                        prop_assert_eq!(c, map.encode(v), "{} x = {}", imp, hex(v));
                    }
                    imp.encode_scaled(enc, x, p, &mut out);
                    for (&v, &c) in x.iter().zip(&out) {
                        prop_assert_eq!(c, map.encode(v * p), "{} x = {}", imp, hex(v));
                    }
                    imp.encode_divided(enc, x, p, &mut out);
                    for (&v, &c) in x.iter().zip(&out) {
                        prop_assert_eq!(c, map.encode(v / p), "{} x = {}", imp, hex(v));
                    }
                }
            }
        }
    }

    #[test]
    fn block_forms_equal_the_binary_search(
        x in prop::collection::vec(prop_oneof![any::<f32>(), -4.0f32..4.0], 0..300),
        size in prop_oneof![1usize..80, Just(64usize), Just(128), Just(256)],
        ps in prop::collection::vec(prop_oneof![any::<f32>(), 0.25f32..4.0, -4.0f32..-0.25], 300),
    ) {
        let ps = &ps[..x.len().div_ceil(size)];
        for imp in Implementation::available() {
            for (map, enc) in maps() {
                let mut out = vec![0u8; x.len()];
                imp.encode_blocks_divided(enc, &x, size, ps, &mut out);
                for (i, (&v, &c)) in x.iter().zip(&out).enumerate() {
                    prop_assert_eq!(c, map.encode(v / ps[i / size]), "{} x = {}", imp, hex(v));
                }
                imp.encode_blocks_scaled(enc, &x, size, ps, &mut out);
                for (i, (&v, &c)) in x.iter().zip(&out).enumerate() {
                    prop_assert_eq!(c, map.encode(v * ps[i / size]), "{} x = {}", imp, hex(v));
                }
                let mut back = vec![0f32; x.len()];
                imp.decode_blocks_scaled(map, &out, size, ps, &mut back);
                for (i, (&c, &o)) in out.iter().zip(&back).enumerate() {
                    prop_assert!(same(o, map.values()[c as usize] * ps[i / size]), "{} [{}]", imp, i);
                }
            }
        }
    }

    #[test]
    fn decode_scaled_equals_the_product(
        codes in prop::collection::vec(any::<u8>(), 0..80),
        scale in any::<f32>(),
    ) {
        for imp in Implementation::available() {
            for map in [DynamicMap::signed(), DynamicMap::unsigned()] {
                let mut out = vec![0f32; codes.len()];
                imp.decode_scaled(map, &codes, scale, &mut out);
                for (&c, &o) in codes.iter().zip(&out) {
                    prop_assert!(same(o, map.values()[c as usize] * scale));
                }
            }
        }
    }
}
