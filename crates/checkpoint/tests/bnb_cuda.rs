//! Bit-exactness against bitsandbytes' **CUDA** kernels: vectors written by bitsandbytes 0.50.2 on
//! an NVIDIA H200 (sm_90), in `testdata/bnb-cuda-sm90/` (provenance in `testdata/README.md`).
//!
//! * 4-bit codes and absmax: equal byte for byte, for every quant type, block size (32 … 4096),
//!   dtype and input (normal, odd tail, Laplace, every decision threshold, short mantissas,
//!   specials: zero blocks, NaN, ±inf, subnormals).
//! * Double quantization: nested absmax and codes equal given the file's offset (torch's GPU mean;
//!   ours is the correctly rounded mean, equal in most tensors — counted, not required).
//! * Dequantization of the GPU's own states: bit-equal to the GPU's (SHA-256 of every tensor).
//! * The 8-bit blockwise codec (signed and unsigned maps, blocks 256 and 2048): codes and absmax
//!   equal, dequantization bit-equal.

use qlora_checkpoint::{Checkpoint, MappedFile, QuantState};
use qlora_codec::{quantize_into, Absmax, Element, QuantType, QuantizedTensor};
use qlora_double_quant::{dequantize_blockwise, quantize_blockwise, DoubleQuantAbsmax, DynamicMap};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

const INPUTS: [&str; 6] = [
    "normal",
    "odd_tail",
    "laplace",
    "thresholds",
    "short_mantissa",
    "specials",
];
const BLOCKS: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

fn testdata(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/bnb-cuda-sm90")
        .join(rel)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn json(file: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(testdata(file)).unwrap()).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[derive(Default)]
struct Counts {
    tensors: usize,
    double_quant: usize,
    offsets_equal: usize,
}

/// The raw bytes of tensor `k`.
fn raw<'a>(st: &SafeTensors<'a>, k: &str) -> &'a [u8] {
    st.tensor(k).unwrap_or_else(|e| panic!("{k}: {e}")).data()
}

fn f32s(st: &SafeTensors<'_>, k: &str) -> Vec<f32> {
    raw(st, k)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The double-quant offset of a quant-state blob: parsed by our reader, or — for the `specials`
/// tensor, which holds ±inf, so that torch's mean is inf and bitsandbytes writes
/// `"nested_offset": Infinity` (not JSON, which our reader refuses on purpose) — read here.
fn nested_offset(blob: &[u8], tag: &str, name: &str) -> Option<f32> {
    match QuantState::from_json_bytes(blob) {
        Ok(state) => {
            assert_eq!(
                state.to_json_bytes(),
                blob,
                "{tag} {name}: quant state JSON"
            );
            state.nested_offset
        }
        Err(e) => {
            assert_eq!(name, "specials", "{tag} {name}: {e}");
            let text = std::str::from_utf8(blob).unwrap();
            match text.rsplit("\"nested_offset\": ").next().unwrap() {
                "Infinity}" => Some(f32::INFINITY),
                "NaN}" => Some(f32::NAN),
                other => panic!("{tag} {name}: unexpected offset {other}"),
            }
        }
    }
}

fn check_config<T: Element>(
    inputs: &Checkpoint<'_>,
    qt: QuantType,
    bs: usize,
    dq: bool,
    dtype: &str,
    deq_sha: &serde_json::Value,
    counts: &mut Counts,
) {
    let tag = format!("{}_{bs}_{}_{dtype}", qt.as_str(), u8::from(dq));
    let mapped = MappedFile::open(testdata(&format!("quantized_{tag}.safetensors"))).unwrap();
    let gpu = SafeTensors::deserialize(mapped.bytes()).unwrap();
    for name in INPUTS {
        counts.tensors += 1;
        let x: Vec<T> = inputs.dense_as(name).unwrap();
        let shape = inputs.tensor(name).unwrap().shape().to_vec();
        let blob = raw(
            &gpu,
            &format!("{name}.quant_state.bitsandbytes__{}", qt.as_str()),
        );
        let offset = nested_offset(blob, &tag, name);
        assert_eq!(offset.is_some(), dq);
        let gpu_packed = raw(&gpu, name);
        // Codes and absmax, byte for byte.
        let mut packed = vec![0u8; x.len().div_ceil(2)];
        let mut absmax = vec![0f32; x.len().div_ceil(bs)];
        quantize_into(qt, &x, bs, &mut packed, &mut absmax).unwrap();
        assert_eq!(packed.len(), gpu_packed.len());
        if let Some(i) = (0..packed.len()).find(|&i| packed[i] != gpu_packed[i]) {
            panic!(
                "{tag} {name}: packed byte {i} is {:#04x}, the GPU wrote {:#04x} (elements {} and {})",
                packed[i],
                gpu_packed[i],
                x[2 * i].to_f32(),
                x.get(2 * i + 1).map_or(0.0, |v| v.to_f32())
            );
        }
        let stored_absmax = match offset {
            None => {
                let want = f32s(&gpu, &format!("{name}.absmax"));
                assert_eq!(bits(&absmax), bits(&want), "{tag} {name}: absmax");
                Absmax::F32(want)
            }
            Some(offset) => {
                counts.double_quant += 1;
                let want = DoubleQuantAbsmax {
                    codes: raw(&gpu, &format!("{name}.absmax")).to_vec(),
                    nested_absmax: f32s(&gpu, &format!("{name}.nested_absmax")),
                    offset,
                };
                let ours = DoubleQuantAbsmax::compress_with_offset(&absmax, offset);
                assert_eq!(ours.codes, want.codes, "{tag} {name}: nested codes");
                assert_eq!(
                    bits(&ours.nested_absmax),
                    bits(&want.nested_absmax),
                    "{tag} {name}: nested absmax"
                );
                if DoubleQuantAbsmax::compress(&absmax).offset.to_bits() == offset.to_bits() {
                    counts.offsets_equal += 1;
                }
                Absmax::Double(want)
            }
        };
        // Dequantization of the GPU's state: bit-equal to the GPU's output.
        let stored = QuantizedTensor::from_parts(
            qt,
            bs,
            T::DTYPE,
            shape.clone(),
            gpu_packed.to_vec(),
            stored_absmax,
        )
        .unwrap();
        let out: Vec<T> = stored.dequantize().unwrap();
        assert_eq!(
            sha256_hex(bytemuck::cast_slice(&out)),
            deq_sha[&tag][name].as_str().unwrap(),
            "{tag} {name}: dequantized"
        );
        // The whole tensor through the public constructor (without double quant: identical).
        if !dq {
            let options = qlora_codec::QuantizeOptions {
                quant_type: qt,
                blocksize: bs,
                double_quant: false,
            };
            let q = QuantizedTensor::quantize(&x, &shape, options).unwrap();
            assert_eq!(q, stored, "{tag} {name}: QuantizedTensor");
        }
    }
}

fn check_dtype<T: Element>(dtype: &str) {
    let mapped = MappedFile::open(testdata(&format!("inputs_{dtype}.safetensors"))).unwrap();
    let inputs = mapped.checkpoint().unwrap();
    let deq_sha = json("dequantized_sha256.json");
    let mut counts = Counts::default();
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for bs in BLOCKS {
            for dq in [false, true] {
                check_config::<T>(&inputs, qt, bs, dq, dtype, &deq_sha, &mut counts);
            }
        }
    }
    assert_eq!(counts.tensors, 2 * 8 * 2 * INPUTS.len());
    eprintln!(
        "{dtype}: {} tensors equal to the GPU's; double-quant offset (mean) equal to torch's GPU mean in {} of {}",
        counts.tensors, counts.offsets_equal, counts.double_quant
    );
    // The correctly rounded mean is torch's GPU reduction in most tensors; where it is not, the
    // difference is an ulp of the offset (and a reader always uses the stored value).
    assert!(counts.offsets_equal * 2 >= counts.double_quant);
}

#[test]
fn quantize_4bit_equals_the_gpu_f32() {
    check_dtype::<f32>("f32");
}

#[test]
fn quantize_4bit_equals_the_gpu_f16() {
    check_dtype::<half::f16>("f16");
}

#[test]
fn quantize_4bit_equals_the_gpu_bf16() {
    check_dtype::<half::bf16>("bf16");
}

#[test]
fn blockwise_8bit_equals_the_gpu() {
    let mapped = MappedFile::open(testdata("blockwise8.safetensors")).unwrap();
    let ck = mapped.checkpoint().unwrap();
    let sha = json("blockwise8_sha256.json");
    let input: Vec<f32> = ck.dense_as("input").unwrap();
    let magnitudes: Vec<f32> = input.iter().map(|x| x.abs()).collect();
    for (map_name, map, x) in [
        ("signed", DynamicMap::signed(), &input),
        ("unsigned", DynamicMap::unsigned(), &magnitudes),
    ] {
        for bs in [256usize, 2048] {
            let p = format!("{map_name}_{bs}");
            let mut codes = vec![0u8; x.len()];
            let mut absmax = vec![0f32; x.len().div_ceil(bs)];
            quantize_blockwise(map, x, bs, &mut codes, &mut absmax).unwrap();
            let want_codes = ck.tensor(&format!("{p}.codes")).unwrap().data().to_vec();
            let differing = codes
                .iter()
                .zip(&want_codes)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differing, 0, "{p}: {differing} codes differ");
            let want_absmax: Vec<f32> = ck.dense_as(&format!("{p}.absmax")).unwrap();
            assert_eq!(bits(&absmax), bits(&want_absmax), "{p}: absmax");
            let mut out = vec![0f32; x.len()];
            dequantize_blockwise(map, &want_codes, &want_absmax, bs, &mut out).unwrap();
            assert_eq!(
                sha256_hex(bytemuck::cast_slice(&out)),
                sha[format!("{p}.dequantized")].as_str().unwrap(),
                "{p}: dequantized"
            );
        }
    }
}
