//! The golden vector of the reference notes (§10 of `bitsandbytes.md`): a million-element input
//! whose NF4 codes, absmax and dequantized outputs were checked against bitsandbytes 0.50.2 and an
//! independent transliteration of the CUDA decision tree. Compared by SHA-256.

use half::bf16;
use qlora_codec::{dequantize_into, quantize_into, AbsmaxView, QuantType};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn golden_input() -> Vec<f32> {
    (0..1_000_003u64)
        .map(|i| (((i * 7919) % 2001) as f32 - 1000.0) / 256.0)
        .collect()
}

fn check(blocksize: usize, packed_sha: &str, absmax_sha: &str, f32_sha: &str, bf16_sha: &str) {
    let x = golden_input();
    let mut packed = vec![0u8; x.len().div_ceil(2)];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    quantize_into(QuantType::Nf4, &x, blocksize, &mut packed, &mut absmax).unwrap();
    assert_eq!(hex(&packed), packed_sha, "packed codes, block {blocksize}");
    assert_eq!(
        hex(bytemuck::cast_slice(&absmax)),
        absmax_sha,
        "absmax, block {blocksize}"
    );
    let mut out = vec![0f32; x.len()];
    dequantize_into(
        QuantType::Nf4,
        &packed,
        AbsmaxView::F32(&absmax),
        blocksize,
        &mut out,
    )
    .unwrap();
    assert_eq!(hex(bytemuck::cast_slice(&out)), f32_sha, "f32 dequant");
    let mut out16 = vec![bf16::ZERO; x.len()];
    dequantize_into(
        QuantType::Nf4,
        &packed,
        AbsmaxView::F32(&absmax),
        blocksize,
        &mut out16,
    )
    .unwrap();
    assert_eq!(hex(bytemuck::cast_slice(&out16)), bf16_sha, "bf16 dequant");
    if blocksize == 64 {
        assert_eq!(
            &packed[..8],
            &[0x0f, 0xee, 0xed, 0xcc, 0xba, 0x98, 0x76, 0x54]
        );
        assert_eq!(*packed.last().unwrap(), 0x07);
        assert_eq!(
            &absmax[..4],
            &[3.90625, 3.851_562_5, 3.839_843_8, 3.867_187_5]
        );
    }
}

#[test]
fn golden_nf4_block64() {
    check(
        64,
        "d962dfab2a7c92e2c8d30ec55313735673cff2206e65b65a9ea03cfe79f34e8d",
        "f336b8a4eb0739e3512a4ab8d63a37c645fc6dd91027abd185ec32ed6583d63d",
        "fbe330bc3c483dff0a8449ea9852fba1c1decb9439dd7e8c32459caa338e9740",
        "0c1b9f48058f0621a474bff932db5e8e362ac5e0509a83880583acdd06b2bf2f",
    );
}

#[test]
fn golden_nf4_block128() {
    check(
        128,
        "56f9e089d43430717ef149cfcc28a8f9d7adfbccc26530f615c537ece76c51ae",
        "2765eb3493092777f7a7ee6a252f1ef6c695aace61d4e077e17f0292e8233ec5",
        "728a416b3011be74a61e00cd0b2f29580543fb881a53ad7e97e0c7999bb5d56d",
        "8a467f1e4ab52c0b5ab110753614b1c1743432b27931ba6ec46be93bf102eee8",
    );
}
