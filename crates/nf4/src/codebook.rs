//! The 4-bit code tables (NF4, FP4) and bitsandbytes' decision rules for choosing a code.

use statrs::distribution::{ContinuousCDF, Normal};

/// The NF4 codebook as bitsandbytes hard-codes it (`nf4_dequantization_lut` in `csrc/kernels.cu`,
/// `get_4bit_type("nf4")`), as f32 bit patterns. Index = 4-bit code; sorted ascending; code 7 is
/// exactly 0.0; code 0 is −1.0 and code 15 is +1.0.
pub const NF4_TABLE_BITS: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];

/// The NF4 codebook values (see [`NF4_TABLE_BITS`]).
pub const NF4_TABLE: [f32; 16] = bits_to_f32(&NF4_TABLE_BITS);

/// The 15 NF4 decision thresholds of bitsandbytes' CUDA `dQuantizeNF4`, as f32 bit patterns:
/// `T[i-1]` separates code `i-1` from code `i`.
///
/// These are the kernel's decimal literals (`0.8614784181118011f`, …) *correctly rounded* to f32
/// by the CUDA compiler. For four of them (T1, T9, T13, T15) that is one ulp away from the f64
/// literal rounded to f32 (`0.8614784181118011_f64 as f32`), which is what bitsandbytes' CPU backend
/// compares with ([`NF4_THRESHOLDS_CPU_BACKEND`]); the GPU's thresholds are the default here since
/// that is what a checkpoint quantized on a GPU contains.
pub const NF4_THRESHOLD_BITS: [u32; 15] = [
    0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff,
    0x3df64863, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9,
];

/// The NF4 decision thresholds the CUDA kernels use (see [`NF4_THRESHOLD_BITS`]).
pub const NF4_THRESHOLDS: [f32; 15] = {
    let mut t = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        t[i] = f32::from_bits(NF4_THRESHOLD_BITS[i]);
        i += 1;
    }
    t
};

/// The thresholds of bitsandbytes' CPU (PyTorch) backend: the f32 midpoints of adjacent
/// [`NF4_TABLE`] entries, equal to the f64 literals rounded to f32. They differ from
/// [`NF4_THRESHOLDS`] by one ulp at T1, T9, T13 and T15. Kept for comparisons with vectors written
/// by bitsandbytes on a CPU; nothing in the library quantizes with them.
pub const NF4_THRESHOLDS_CPU_BACKEND: [f32; 15] = [
    -0.848_096_4,
    -0.610_632_9,
    -0.459_995_27,
    -0.339_679_42,
    -0.234_607_4,
    -0.137_911_74,
    -0.045_525_018,
    0.039_790_15,
    0.120_255_25,
    0.203_521_25,
    0.292_013_76,
    0.389_312_54,
    0.501_663_45,
    0.642_786_9,
    0.861_478_45,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit) magnitudes by the low three bits of the code, divided
/// by 12 (`fp4_dequantization_lut` in `csrc/kernels.cu`). Note the bit-pattern order is not the
/// value order.
pub const FP4_MAGNITUDES: [f32; 8] = [
    0.0,
    0.005_208_333_3,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
];

/// The FP4 codebook as the CUDA dequantization kernel applies it: `FP4_MAGNITUDES[c & 7]`, negated
/// when bit 3 is set. Code 8 is therefore −0.0 here, while the `quant_map` bitsandbytes serializes
/// has +0.0 there ([`FP4_QUANT_MAP`]); the two differ only in the sign of zero.
pub const FP4_TABLE: [f32; 16] = {
    let mut t = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        let m = FP4_MAGNITUDES[i & 7];
        t[i] = if i & 8 != 0 { -m } else { m };
        i += 1;
    }
    t
};

/// The FP4 `quant_map` bitsandbytes writes into checkpoints (`get_4bit_type("fp4")`): like
/// [`FP4_TABLE`] but with +0.0 at code 8.
pub const FP4_QUANT_MAP: [f32; 16] = {
    let mut t = FP4_TABLE;
    t[8] = 0.0;
    t
};

/// The seven FP4 magnitude thresholds of `dQuantizeFP4` (f32 literals; not exact midpoints).
pub const FP4_THRESHOLDS: [f32; 7] = [
    0.002_604_17,
    0.085_937_5,
    0.208_333_33,
    0.291_666_67,
    0.416_666_7,
    0.583_333,
    0.833_333_3,
];

const fn bits_to_f32(bits: &[u32; 16]) -> [f32; 16] {
    let mut t = [0.0f32; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = f32::from_bits(bits[i]);
        i += 1;
    }
    t
}

/// NF4 code of a normalized value, exactly as `dQuantizeNF4` (CUDA build, [`NF4_THRESHOLDS`]): the
/// number of thresholds that `xn` strictly exceeds. A value exactly on a threshold takes the lower code; NaN gives code 0.
#[inline]
pub fn encode_nf4(xn: f32) -> u8 {
    let t = &NF4_THRESHOLDS;
    // The kernel's balanced tree, written out: four comparisons per value.
    if xn > t[7] {
        if xn > t[11] {
            if xn > t[13] {
                if xn > t[14] {
                    15
                } else {
                    14
                }
            } else if xn > t[12] {
                13
            } else {
                12
            }
        } else if xn > t[9] {
            if xn > t[10] {
                11
            } else {
                10
            }
        } else if xn > t[8] {
            9
        } else {
            8
        }
    } else if xn > t[3] {
        if xn > t[5] {
            if xn > t[6] {
                7
            } else {
                6
            }
        } else if xn > t[4] {
            5
        } else {
            4
        }
    } else if xn > t[1] {
        if xn > t[2] {
            3
        } else {
            2
        }
    } else if xn > t[0] {
        1
    } else {
        0
    }
}

/// FP4 code of a normalized value, exactly as `dQuantizeFP4`: sign bit 3 set when `xn < 0`
/// (so −0.0 and NaN are positive), magnitude by a strict-`>` tree over [`FP4_THRESHOLDS`].
///
/// `xn` is the already flushed product: in the CUDA build a negative product that underflows is
/// −0.0 and gets code 0 ([`crate::scalar::quantize_blocks`] flushes before calling this).
#[inline]
pub fn encode_fp4(xn: f32) -> u8 {
    let sign = if xn < 0.0 { 0b1000 } else { 0 };
    let m = xn.abs();
    let t = &FP4_THRESHOLDS;
    let pattern = if m > t[3] {
        if m > t[5] {
            if m > t[6] {
                0b011
            } else {
                0b010
            }
        } else if m > t[4] {
            0b101
        } else {
            0b100
        }
    } else if m > t[1] {
        if m > t[2] {
            0b111
        } else {
            0b110
        }
    } else if m > t[0] {
        0b001
    } else {
        0b000
    };
    pattern | sign
}

/// The NF4 codebook rebuilt from first principles, the way bitsandbytes' `create_normal_map(offset
/// = 0.9677083, use_extra_value = True)` builds it: 8 positive quantiles of the standard normal at
/// probabilities `linspace(offset, 0.5, 9)[:-1]`, 7 negative ones at `linspace(offset, 0.5,
/// 8)[:-1]`, an exact zero, each rounded to f32 and normalized by the largest.
///
/// The probabilities are computed as torch's float32 `linspace` computes them (one rounding of
/// `start + step·i` for the first half and `end − step·(steps−1−i)` for the second). The result
/// equals [`NF4_TABLE`] bit for bit (tested), so the library uses the hard-coded table.
pub fn nf4_from_normal_quantiles() -> [f32; 16] {
    const OFFSET: f32 = 0.967_708_3;
    let normal = Normal::standard();
    let ppf = |p: f32| normal.inverse_cdf(p as f64) as f32;
    let positives: Vec<f32> = torch_linspace_f32(OFFSET, 0.5, 9)[..8]
        .iter()
        .map(|&p| ppf(p))
        .collect();
    let negatives: Vec<f32> = torch_linspace_f32(OFFSET, 0.5, 8)[..7]
        .iter()
        .map(|&p| -ppf(p))
        .collect();
    let mut values: Vec<f32> = positives.into_iter().chain(negatives).collect();
    values.push(0.0);
    values.sort_by(f32::total_cmp);
    let max = values[values.len() - 1];
    let mut table = [0.0f32; 16];
    for (t, v) in table.iter_mut().zip(&values) {
        *t = v / max;
    }
    table
}

/// torch's vectorized float32 `linspace`: `step = (end − start) / (steps − 1)` in f32; the first
/// half is `start + step·i`, the second `end − step·(steps − 1 − i)`, each rounded once.
pub(crate) fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                (start as f64 + step as f64 * i as f64) as f32
            } else {
                (end as f64 - step as f64 * (steps - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// Quantile function of the standard normal, used for the NF4 construction (exposed for tests and
/// for building other NormalFloat variants).
pub fn normal_quantile(p: f64) -> f64 {
    Normal::standard().inverse_cdf(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_from_quantiles_equals_bitsandbytes_table() {
        let built = nf4_from_normal_quantiles();
        for (i, (b, t)) in built.iter().zip(&NF4_TABLE).enumerate() {
            assert_eq!(b.to_bits(), t.to_bits(), "code {i}: {b} vs {t}");
        }
    }

    #[test]
    fn linspace_matches_torch() {
        // The probabilities the reference notes list for torch.linspace(0.9677083, 0.5, 9).
        let expected = [
            0.967_708_3,
            0.909_244_8,
            0.850_781_2,
            0.792_317_7,
            0.733_854_2,
            0.675_390_6,
            0.616_927_1,
            0.558_463_5,
            0.5,
        ];
        let got = torch_linspace_f32(0.967_708_3, 0.5, 9);
        for (g, e) in got.iter().zip(&expected) {
            assert_eq!(g.to_bits(), (*e as f32).to_bits(), "{g} vs {e}");
        }
    }

    #[test]
    fn nf4_cpu_thresholds_are_f32_midpoints() {
        for i in 1..16 {
            let mid = (NF4_TABLE[i - 1] + NF4_TABLE[i]) / 2.0;
            assert_eq!(
                mid.to_bits(),
                NF4_THRESHOLDS_CPU_BACKEND[i - 1].to_bits(),
                "boundary {i}"
            );
        }
    }

    /// The CUDA thresholds are the decimal literals of `dQuantizeNF4` correctly rounded to f32
    /// (Rust's `f32` parsing rounds correctly), one ulp from the CPU ones at T1, T9, T13, T15.
    #[test]
    #[allow(clippy::excessive_precision)] // the kernel's decimal literals, verbatim, are the point
    fn nf4_cuda_thresholds_are_the_literals_correctly_rounded() {
        let literals: [f32; 15] = [
            -0.8480964004993439,
            -0.6106329262256622,
            -0.4599952697753906,
            -0.33967943489551544,
            -0.23460740596055984,
            -0.13791173323988914,
            -0.045525018125772476,
            0.03979014977812767,
            0.1202552504837513,
            0.2035212516784668,
            0.2920137718319893,
            0.3893125355243683,
            0.5016634166240692,
            0.6427869200706482,
            0.8614784181118011,
        ];
        for (i, ((t, l), c)) in NF4_THRESHOLDS
            .iter()
            .zip(literals)
            .zip(NF4_THRESHOLDS_CPU_BACKEND)
            .enumerate()
        {
            assert_eq!(t.to_bits(), l.to_bits(), "T{}", i + 1);
            let ulps = (t.to_bits() as i64 - c.to_bits() as i64).abs();
            assert_eq!(ulps, i64::from([0, 8, 12, 14].contains(&i)), "T{}", i + 1);
        }
    }

    #[test]
    fn nf4_cpu_threshold_bits_match_the_cpu_backend() {
        let bits = [
            0xbf591cd8u32,
            0xbf1c5270,
            0xbeeb8480,
            0xbeadea76,
            0xbe703cec,
            0xbe0d38bc,
            0xbd3a7871,
            0x3d22faff,
            0x3df64862,
            0x3e5067e0,
            0x3e9582d4,
            0x3ec753f9,
            0x3f006d04,
            0x3f248daf,
            0x3f5c89da,
        ];
        for (t, b) in NF4_THRESHOLDS_CPU_BACKEND.iter().zip(bits) {
            assert_eq!(t.to_bits(), b);
        }
    }

    #[test]
    fn fp4_literals() {
        let bits = [
            0x3b2aaab9u32,
            0x3db00000,
            0x3e555555,
            0x3e955555,
            0x3ed55556,
            0x3f155550,
            0x3f555555,
        ];
        for (t, b) in FP4_THRESHOLDS.iter().zip(bits) {
            assert_eq!(t.to_bits(), b, "{t}");
        }
        let lut = [
            0x00000000u32,
            0x3baaaaab,
            0x3f2aaaab,
            0x3f800000,
            0x3eaaaaab,
            0x3f000000,
            0x3e2aaaab,
            0x3e800000,
        ];
        for (m, b) in FP4_MAGNITUDES.iter().zip(lut) {
            assert_eq!(m.to_bits(), b);
        }
        assert_eq!(FP4_TABLE[8].to_bits(), 0x8000_0000);
        assert_eq!(FP4_QUANT_MAP[8].to_bits(), 0);
    }

    #[test]
    fn encode_nf4_counts_thresholds() {
        let mut s = 0x9e37_79b9u32;
        for _ in 0..100_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = (s as f32 / u32::MAX as f32) * 2.2 - 1.1;
            let count = NF4_THRESHOLDS.iter().filter(|&&t| x > t).count() as u8;
            assert_eq!(encode_nf4(x), count);
        }
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(encode_nf4(t), i as u8, "on threshold → lower code");
            assert_eq!(encode_nf4(t.next_up()), i as u8 + 1);
        }
        assert_eq!(encode_nf4(f32::NAN), 0);
        for (i, &v) in NF4_TABLE.iter().enumerate() {
            assert_eq!(encode_nf4(v), i as u8);
        }
    }

    #[test]
    fn encode_fp4_tree() {
        for (i, &v) in FP4_TABLE.iter().enumerate() {
            if i == 8 {
                continue; // −0.0 encodes as +0 (the sign test is `x < 0`)
            }
            assert_eq!(encode_fp4(v), i as u8, "value {v}");
        }
        assert_eq!(encode_fp4(-0.0), 0);
        assert_eq!(encode_fp4(f32::NAN), 0);
        assert_eq!(encode_fp4(-0.001), 0b1000);
        // On the 0.583333 literal (not the exact midpoint of 1/2 and 2/3) → the lower magnitude.
        assert_eq!(encode_fp4(0.583_333), 0b101);
        assert_eq!(encode_fp4(0.583_333f32.next_up()), 0b010);
    }
}
