//! `QLORA_FORCE_SCALAR=1` makes the entry points use the scalar oracle. The variable is read once
//! per process, so this check lives alone in its own test binary.

use qlora_codec::{dequantize_into, quantize_into, scalar, AbsmaxView, Implementation, QuantType};

#[test]
fn force_scalar_selects_the_oracle() {
    // Edition 2021: `set_var` is safe; this binary runs this one test only.
    std::env::set_var("QLORA_FORCE_SCALAR", "1");
    assert_eq!(Implementation::active(), Implementation::Scalar);
    // The entry points still give the oracle's bytes.
    let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
    let (mut p, mut a) = (vec![0u8; 500], vec![0f32; 16]);
    quantize_into(QuantType::Nf4, &x, 64, &mut p, &mut a).unwrap();
    let (mut p2, mut a2) = (vec![0u8; 500], vec![0f32; 16]);
    scalar::quantize_blocks(QuantType::Nf4, &x, 64, &mut p2, &mut a2);
    assert_eq!(p, p2);
    assert_eq!(a, a2);
    let mut out = vec![0f32; 1000];
    dequantize_into(QuantType::Nf4, &p, AbsmaxView::F32(&a), 64, &mut out).unwrap();
    assert!(Implementation::best().is_available());
    // The fused matrix-vector product runs the oracle too, which equals dequantize-then-dot.
    let q = qlora_codec::QuantizedTensor::quantize(
        &x[..960],
        &[10, 96],
        qlora_codec::QuantizeOptions::qlora(),
    )
    .unwrap();
    let mut y = vec![0f32; 20];
    q.gemv(&x[..192], 2, &mut y).unwrap();
    let w: Vec<f32> = q.dequantize().unwrap();
    for t in 0..2 {
        for j in 0..10 {
            let want = qlora_codec::gemv::dot(&w[j * 96..][..96], &x[t * 96..][..96]).unwrap();
            assert_eq!(y[t * 10 + j].to_bits(), want.to_bits());
        }
    }
}
