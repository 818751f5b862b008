//! Property tests of the file layer: quantize → write → read → dequantize stays within the codec's
//! error bound for every tensor, untouched tensors survive byte for byte, and quant-state blobs
//! parse back to the same state.

use half::bf16;
use proptest::prelude::*;
use qlora_checkpoint::{
    dequantize_file, quantize_file, write_safetensors_atomic, Entry, MappedFile, QuantState,
    QuantizeFileOptions, Selection, TensorData,
};
use qlora_codec::{Dtype, QuantType, QuantizeOptions};

fn quant_type() -> impl Strategy<Value = QuantType> {
    prop_oneof![Just(QuantType::Nf4), Just(QuantType::Fp4)]
}

fn dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn file_roundtrip_within_bound(
        rows in 1usize..40,
        cols in 1usize..90,
        scale in 1e-3f32..10.0,
        seed in any::<u32>(),
        qt in quant_type(),
        bs in proptest::sample::select(qlora_codec::BLOCK_SIZES.to_vec()),
        dq in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let n = rows * cols;
        let mut s = seed | 1;
        let w: Vec<f32> = (0..n).map(|_| {
            s ^= s << 13; s ^= s >> 17; s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * scale
        }).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let bias = vec![0.25f32; rows];
        let input = dir.path().join("in.safetensors");
        write_safetensors_atomic(&input, vec![
            ("layer.weight".to_string(), TensorData::from_elements(&wb, vec![rows, cols])),
            ("layer.bias".to_string(), TensorData::from_f32(&bias, vec![rows])),
        ], None).unwrap();
        let q = dir.path().join("q.safetensors");
        let opts = QuantizeFileOptions {
            quant: QuantizeOptions { quant_type: qt, blocksize: bs, double_quant: dq },
            selection: Selection::default(),
            allow_non_finite: false,
            dq_offsets: Default::default(),
        };
        quantize_file(&input, &q, &opts).unwrap();
        let out = dir.path().join("out.safetensors");
        dequantize_file(&q, &out, None).unwrap();

        let qm = MappedFile::open(&q).unwrap();
        let qc = qm.checkpoint().unwrap();
        let qt_back = qc.quantized("layer.weight").unwrap();
        prop_assert_eq!(qt_back.dtype(), Dtype::BF16);
        let absmax = qt_back.absmax().to_f32();
        let om = MappedFile::open(&out).unwrap();
        let oc = om.checkpoint().unwrap();
        let back: Vec<bf16> = oc.dense_as("layer.weight").unwrap();
        let out_shape = oc.tensor("layer.weight").unwrap().shape().to_vec();
        prop_assert_eq!(out_shape, vec![rows, cols]);
        let half_gap = qt.max_half_gap();
        for (i, (a, b)) in wb.iter().zip(&back).enumerate() {
            let block = &wb[(i / bs) * bs..((i / bs) * bs + bs).min(n)];
            let true_am = block.iter().fold(0f32, |m, x| m.max(x.to_f32().abs()));
            let am = absmax[i / bs];
            // Quantization error, the double-quant error of the absmax, and bf16 output rounding.
            let bound = true_am.max(am) * half_gap + (am - true_am).abs() + am * 2f32.powi(-8) + 1e-30;
            prop_assert!((a.to_f32() - b.to_f32()).abs() <= bound, "element {}: {} vs {}", i, a, b);
        }
        let bias_bytes = oc.tensor("layer.bias").unwrap().data().to_vec();
        prop_assert_eq!(bias_bytes, bytemuck::cast_slice::<f32, u8>(&bias).to_vec());
        let bias_is_dense = matches!(
            qc.entries().iter().find(|e| e.name() == "layer.bias"),
            Some(Entry::Dense { .. })
        );
        prop_assert!(bias_is_dense, "the bias is copied, not quantized");
    }

    #[test]
    fn quant_state_json_roundtrip(
        qt in quant_type(),
        bs in proptest::sample::select(qlora_codec::BLOCK_SIZES.to_vec()),
        dt in dtype(),
        shape in proptest::collection::vec(0usize..5000, 1..4),
        offset in proptest::option::of(prop_oneof![any::<f32>().prop_filter("finite", |x| x.is_finite()), 1e-40f32..1e-30, 1e15f32..1e20]),
    ) {
        let s = QuantState { quant_type: qt, blocksize: bs, dtype: dt, shape, nested_offset: offset };
        let bytes = s.to_json_bytes();
        let back = QuantState::from_json_bytes(&bytes).unwrap();
        prop_assert_eq!(back.nested_offset.map(f32::to_bits), s.nested_offset.map(f32::to_bits));
        prop_assert_eq!(back, s);
    }
}
