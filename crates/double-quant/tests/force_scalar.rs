//! `QLORA_FORCE_SCALAR=1` makes the slice methods use the scalar code. The variable is read once
//! per process, so this check lives alone in its own test binary.

use qlora_double_quant::{DynamicMap, Encoder, Implementation};

#[test]
fn force_scalar_selects_the_scalar_code() {
    // Edition 2021: `set_var` is safe; this binary runs this one test only.
    std::env::set_var("QLORA_FORCE_SCALAR", "1");
    assert_eq!(Implementation::active(), Implementation::Scalar);
    assert!(Implementation::best().is_available());
    // The methods still give the oracle's codes.
    let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 1.1).collect();
    let mut codes = vec![0u8; x.len()];
    Encoder::signed().encode_scaled(&x, 0.97, &mut codes);
    for (&v, &c) in x.iter().zip(&codes) {
        assert_eq!(c, DynamicMap::signed().encode(v * 0.97));
    }
    let mut back = vec![0f32; x.len()];
    DynamicMap::signed().decode_scaled(&codes, 0.5, &mut back);
    for (&c, &b) in codes.iter().zip(&back) {
        assert_eq!(
            b.to_bits(),
            (DynamicMap::signed().decode(c) * 0.5).to_bits()
        );
    }
}
