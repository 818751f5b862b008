//! Property tests of the codec: error bound, idempotence, threading independence, edge cases.

use half::{bf16, f16};
use proptest::prelude::*;
use qlora_codec::{
    quantize_into, scalar, Absmax, AbsmaxView, Element, QuantType, QuantizeOptions,
    QuantizedTensor, BLOCK_SIZES,
};

fn quant_type() -> impl Strategy<Value = QuantType> {
    prop_oneof![Just(QuantType::Nf4), Just(QuantType::Fp4)]
}

fn blocksize() -> impl Strategy<Value = usize> {
    proptest::sample::select(BLOCK_SIZES.to_vec())
}

/// Finite values over several scales, with exact zeros sprinkled in.
fn values(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(
        prop_oneof![
            8 => -1.0e3f32..1.0e3,
            4 => -1.0f32..1.0,
            2 => -1.0e-3f32..1.0e-3,
            1 => Just(0.0f32),
        ],
        1..max_len,
    )
}

fn bound_holds<T: Element>(x: &[T], q: &QuantizedTensor) -> Result<(), TestCaseError> {
    let back: Vec<f32> = q.dequantize().unwrap();
    let absmax = q.absmax().to_f32();
    let half_gap = q.quant_type().max_half_gap();
    for (i, (a, b)) in x.iter().zip(&back).enumerate() {
        let a = a.to_f32();
        let am = absmax[i / q.blocksize()];
        // Reconstructed absmax (double quant) may differ from the true one; bound with both.
        let true_am = scalar::absmax_of(
            &x[i / q.blocksize() * q.blocksize()..][..q
                .blocksize()
                .min(x.len() - i / q.blocksize() * q.blocksize())],
        );
        let slack = (am - true_am).abs() + f32::EPSILON * am.abs() * 2.0;
        let bound = true_am * half_gap + slack + 1e-30;
        prop_assert!(
            (a - b).abs() <= bound * 1.0001,
            "element {i}: {a} vs {b}, bound {bound}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn roundtrip_error_bounded(x in values(3000), qt in quant_type(), bs in blocksize(), dq in any::<bool>()) {
        let opts = QuantizeOptions { quant_type: qt, blocksize: bs, double_quant: dq };
        let q = QuantizedTensor::quantize(&x, &[x.len()], opts).unwrap();
        if !dq {
            bound_holds(&x, &q)?;
        } else {
            // With double quant the bound is relative to the reconstructed absmax.
            let back: Vec<f32> = q.dequantize().unwrap();
            let am = q.absmax().to_f32();
            for (i, (a, b)) in x.iter().zip(&back).enumerate() {
                let true_am = scalar::absmax_of(&x[(i / bs) * bs..((i / bs) * bs + bs).min(x.len())]);
                let bound = true_am.max(am[i / bs]) * qt.max_half_gap() + (am[i / bs] - true_am).abs() + 1e-30;
                prop_assert!((a - b).abs() <= bound * 1.0001, "element {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn requantize_is_idempotent(x in values(3000), qt in quant_type(), bs in blocksize()) {
        let opts = QuantizeOptions { quant_type: qt, blocksize: bs, double_quant: false };
        let q = QuantizedTensor::quantize(&x, &[x.len()], opts).unwrap();
        let back: Vec<f32> = q.dequantize().unwrap();
        let q2 = QuantizedTensor::quantize(&back, &[x.len()], opts).unwrap();
        // FP4's −0 code (8) dequantizes to −0.0, which re-encodes as +0 (code 0): compare values.
        let back2: Vec<f32> = q2.dequantize().unwrap();
        prop_assert_eq!(q.absmax(), q2.absmax());
        for (a, b) in back.iter().zip(&back2) {
            prop_assert!(a == b, "{a} vs {b}");
        }
        if qt == QuantType::Nf4 {
            prop_assert_eq!(q.packed(), q2.packed());
        }
    }

    #[test]
    fn half_inputs_bound(x in values(2000), bs in blocksize()) {
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let opts = QuantizeOptions { quant_type: QuantType::Nf4, blocksize: bs, double_quant: false };
        let qh = QuantizedTensor::quantize(&h, &[h.len()], opts).unwrap();
        let qb = QuantizedTensor::quantize(&b, &[b.len()], opts).unwrap();
        // Quantization error plus the output rounding of the 16-bit type.
        let hb: Vec<f16> = qh.dequantize().unwrap();
        let bb: Vec<bf16> = qb.dequantize().unwrap();
        let ah = qh.absmax().to_f32();
        let ab = qb.absmax().to_f32();
        for i in 0..x.len() {
            let e = (h[i].to_f32() - hb[i].to_f32()).abs();
            prop_assert!(e <= ah[i / bs] * 0.1519 * 1.001 + ah[i / bs] * 2f32.powi(-10) + 6e-8);
            let e = (b[i].to_f32() - bb[i].to_f32()).abs();
            prop_assert!(e <= ab[i / bs] * 0.1519 * 1.001 + ab[i / bs] * 2f32.powi(-7));
        }
    }

    #[test]
    fn threads_do_not_change_bytes(seed in any::<u32>(), qt in quant_type(), bs in blocksize()) {
        // Above the parallel threshold vs block-by-block scalar oracle.
        let n = qlora_codec::PARALLEL_THRESHOLD + 12_345;
        let mut s = seed | 1;
        let x: Vec<f32> = (0..n).map(|_| { s ^= s << 13; s ^= s >> 17; s ^= s << 5; s as f32 / u32::MAX as f32 - 0.5 }).collect();
        let mut p1 = vec![0u8; n.div_ceil(2)];
        let mut a1 = vec![0f32; n.div_ceil(bs)];
        quantize_into(qt, &x, bs, &mut p1, &mut a1).unwrap();
        let mut p2 = vec![0u8; n.div_ceil(2)];
        let mut a2 = vec![0f32; n.div_ceil(bs)];
        scalar::quantize_blocks(qt, &x, bs, &mut p2, &mut a2);
        prop_assert_eq!(&p1, &p2);
        prop_assert_eq!(&a1, &a2);
        let mut o1 = vec![0f32; n];
        qlora_codec::dequantize_into(qt, &p1, AbsmaxView::F32(&a1), bs, &mut o1).unwrap();
        let mut o2 = vec![0f32; n];
        scalar::dequantize_range(qt, &p1, AbsmaxView::F32(&a1), bs, 0, &mut o2);
        prop_assert!(o1.iter().zip(&o2).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn range_dequant_equals_full(x in values(1500), bs in blocksize(), start in 0usize..1500, len in 0usize..700) {
        let q = QuantizedTensor::quantize(&x, &[x.len()], QuantizeOptions::qlora().with_blocksize(bs)).unwrap();
        let full: Vec<f32> = q.dequantize().unwrap();
        let start = start.min(x.len());
        let len = len.min(x.len() - start);
        let mut part = vec![0f32; len];
        q.dequantize_range_into(start, &mut part).unwrap();
        prop_assert_eq!(&part[..], &full[start..start + len]);
    }
}

#[test]
fn edge_cases_follow_cuda() {
    // All-zero block + odd length.
    let mut x = vec![0f32; 64 + 33];
    x[70] = 0.5;
    let q = QuantizedTensor::quantize(
        &x,
        &[97],
        QuantizeOptions {
            double_quant: false,
            ..QuantizeOptions::qlora()
        },
    )
    .unwrap();
    assert!(
        q.packed()[..32].iter().all(|&b| b == 0x00),
        "all-zero block → 0x00"
    );
    let Absmax::F32(a) = q.absmax() else {
        unreachable!()
    };
    assert_eq!(a[0], 0.0);
    assert_eq!(q.packed()[48] & 0x0f, 7, "pad nibble is the code of zero");
    let back: Vec<f32> = q.dequantize().unwrap();
    assert!(back[..64]
        .iter()
        .all(|v| v.to_bits() == (-0.0f32).to_bits()));

    // NaN is ignored by the absmax and encodes as code 0.
    let y = [1.0f32, f32::NAN, -0.5, 0.25];
    let q = QuantizedTensor::quantize(
        &y,
        &[4],
        QuantizeOptions {
            blocksize: 32,
            double_quant: false,
            ..QuantizeOptions::qlora()
        },
    )
    .unwrap();
    assert_eq!(q.absmax().to_f32(), vec![1.0]);
    assert_eq!(q.packed()[0], 0xf0);

    // +Inf: absmax inf, inf itself → 0 (NaN), finite → 7.
    let z = [f32::INFINITY, 3.0, -2.0, 0.0];
    let q = QuantizedTensor::quantize(
        &z,
        &[4],
        QuantizeOptions {
            blocksize: 32,
            double_quant: false,
            ..QuantizeOptions::qlora()
        },
    )
    .unwrap();
    assert_eq!(q.packed(), &[0x07, 0x77]);

    // Values exactly on every threshold (absmax 1 keeps x·(1/absmax) exact) take the lower code.
    let mut t: Vec<f32> = qlora_codec::codebook::NF4_THRESHOLDS.to_vec();
    t.push(1.0);
    let q = QuantizedTensor::quantize(
        &t,
        &[16],
        QuantizeOptions {
            blocksize: 32,
            double_quant: false,
            ..QuantizeOptions::qlora()
        },
    )
    .unwrap();
    let codes: Vec<u8> = (0..16).map(|i| scalar::code_at(q.packed(), i)).collect();
    assert_eq!(codes, (0..15).chain([15]).collect::<Vec<u8>>());
}

#[test]
fn bytes_per_parameter() {
    let n = 4096 * 4096;
    let x = vec![0.5f32; n];
    let cases = [
        (64, false, 4.5),
        (64, true, 4.127),
        (128, false, 4.25),
        (128, true, 4.0635),
        (32, true, 4.254),
    ];
    for (bs, dq, bits) in cases {
        let opts = QuantizeOptions {
            quant_type: QuantType::Nf4,
            blocksize: bs,
            double_quant: dq,
        };
        let q = QuantizedTensor::quantize(&x, &[4096, 4096], opts).unwrap();
        assert!(
            (q.bits_per_param() - bits).abs() < 5e-4,
            "bs {bs} dq {dq}: {}",
            q.bits_per_param()
        );
        let expected = qlora_double_quant::absmax_bits_per_param(bs, dq) + 4.0;
        assert!((q.bits_per_param() - expected).abs() < 1e-5);
    }
}

#[test]
fn bad_options_are_errors() {
    let x = [1.0f32; 10];
    let e = QuantizedTensor::quantize(&x, &[10], QuantizeOptions::qlora().with_blocksize(48))
        .unwrap_err();
    assert_eq!(e, qlora_codec::Error::BlockSize(48));
    let e = QuantizedTensor::quantize(&x, &[3, 4], QuantizeOptions::qlora()).unwrap_err();
    assert!(matches!(e, qlora_codec::Error::Shape { .. }));
}
