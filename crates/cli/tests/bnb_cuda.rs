//! `qlora quantize` against files bitsandbytes 0.50.2 wrote on an NVIDIA H200
//! (`testdata/bnb-cuda-sm90/quantized_*.safetensors`, provenance in `testdata/README.md`): every
//! tensor of the output — packed codes, absmax, quant maps, quant-state JSON, nested absmax and
//! codes — equals the GPU file's byte for byte, for every quant type, block size and dtype,
//! without double quantization, and with it when the file's offsets are passed with
//! `--dq-offset` (without them only the offset-dependent tensors may differ, where our correctly
//! rounded mean differs from torch's GPU mean).

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;

const INPUTS: [&str; 6] = [
    "normal",
    "odd_tail",
    "laplace",
    "thresholds",
    "short_mantissa",
    "specials",
];

fn testdata(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/bnb-cuda-sm90")
        .join(rel)
}

/// The quant-state JSON's `nested_offset` as written (Python's repr of the f32 as f64).
fn offset_text(st: &SafeTensors<'_>, name: &str, qt: &str) -> String {
    let blob = st
        .tensor(&format!("{name}.quant_state.bitsandbytes__{qt}"))
        .unwrap()
        .data();
    let text = std::str::from_utf8(blob).unwrap();
    let v = text.rsplit("\"nested_offset\": ").next().unwrap();
    v.trim_end_matches('}').to_string()
}

fn quantize(input: &Path, out: &Path, qt: &str, bs: usize, extra: &[String]) {
    let o = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["quantize", "--quiet", "--allow-non-finite", "--only", ".*"])
        .args(["--quant-type", qt, "--blocksize", &bs.to_string()])
        .args(extra)
        .arg(input)
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qlora quantize {qt} {bs} {extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Names of the tensors that differ between two files, which must hold the same names (tensors
/// of the inputs in `skip` are left out of both).
fn differing(ours: &SafeTensors<'_>, gpu: &SafeTensors<'_>, skip: &[String]) -> Vec<String> {
    let kept = |st: &SafeTensors<'_>| {
        let mut v: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| !skip.iter().any(|s| n.split('.').next() == Some(s.as_str())))
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let names = kept(gpu);
    assert_eq!(kept(ours), names, "tensor names");
    names
        .into_iter()
        .filter(|n| {
            let (a, b) = (ours.tensor(n).unwrap(), gpu.tensor(n).unwrap());
            (a.dtype(), a.shape(), a.data()) != (b.dtype(), b.shape(), b.data())
        })
        .collect()
}

#[test]
fn quantize_output_equals_the_gpu_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut files, mut offset_dependent) = (0, 0);
    for dtype in ["f32", "f16", "bf16"] {
        let input = testdata(&format!("inputs_{dtype}.safetensors"));
        for qt in ["nf4", "fp4"] {
            for bs in [32usize, 64, 128, 256, 512, 1024, 2048, 4096] {
                for dq in [false, true] {
                    let tag = format!("{qt}_{bs}_{}_{dtype}", u8::from(dq));
                    let gpu_bytes =
                        std::fs::read(testdata(&format!("quantized_{tag}.safetensors"))).unwrap();
                    let gpu = SafeTensors::deserialize(&gpu_bytes).unwrap();
                    let out = tmp.path().join(format!("{tag}.safetensors"));
                    // `specials` holds ±inf: with double quantization its offset is inf, which
                    // bitsandbytes writes as `Infinity` (not JSON) and we refuse to write.
                    let mut skip = Vec::new();
                    let mut extra = Vec::new();
                    if dq {
                        extra.push("--double-quant".to_string());
                        extra.push("--skip".to_string());
                        extra.push("^specials$".to_string());
                        skip.push("specials".to_string());
                    }
                    quantize(&input, &out, qt, bs, &extra);
                    let ours_bytes = std::fs::read(&out).unwrap();
                    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
                    if !dq {
                        let d = differing(&ours, &gpu, &skip);
                        assert!(d.is_empty(), "{tag}: {d:?} differ");
                        files += 1;
                        continue;
                    }
                    // Without offsets: only offset-dependent tensors may differ.
                    let d = differing(&ours, &gpu, &skip);
                    for n in &d {
                        assert!(
                            n.ends_with(".absmax")
                                || n.ends_with(".nested_absmax")
                                || n.contains(".quant_state."),
                            "{tag}: {n} differs"
                        );
                        if n.contains(".quant_state.") {
                            offset_dependent += 1;
                        }
                    }
                    // With the GPU's offsets: everything equal.
                    for name in INPUTS.iter().filter(|n| **n != "specials") {
                        extra.push("--dq-offset".to_string());
                        extra.push(format!("{name}={}", offset_text(&gpu, name, qt)));
                    }
                    quantize(&input, &out, qt, bs, &extra);
                    let ours_bytes = std::fs::read(&out).unwrap();
                    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
                    let d = differing(&ours, &gpu, &skip);
                    assert!(d.is_empty(), "{tag} with --dq-offset: {d:?} differ");
                    files += 1;
                }
            }
        }
    }
    assert_eq!(files, 96);
    println!(
        "96 GPU files reproduced tensor for tensor; without --dq-offset {offset_dependent} of 240 \
         double-quantized tensors had a different offset (torch's GPU mean vs the correctly \
         rounded mean)"
    );
}

#[test]
fn dq_offset_needs_double_quant_and_a_number() {
    let tmp = tempfile::tempdir().unwrap();
    let input = testdata("inputs_f32.safetensors");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qlora"))
            .args(["quantize", "--quiet", "--only", "^normal$"])
            .args(args)
            .arg(&input)
            .arg(tmp.path().join("o.safetensors"))
            .output()
            .unwrap()
    };
    let o = run(&["--dq-offset", "normal=0.5"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--double-quant"));
    for bad in ["normal", "=0.5", "normal=x", "normal=1e39", "normal=nan"] {
        let o = run(&["--double-quant", "--dq-offset", bad]);
        assert!(!o.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--dq-offset"), "{bad}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{bad}: {err}");
    }
    assert!(!tmp.path().join("o.safetensors").exists());
}
