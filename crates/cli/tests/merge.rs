//! `qlora merge` on the tiny Llama and PEFT's adapters (testdata/peft, tools/gen_peft_vectors.py).

use qlora_lora::peft::{AdapterConfig, PeftAdapter, TargetModules};
use qlora_lora::AdapterWeights;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn tensors(dir: &Path) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(e.path()).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (k, v) in st.tensors() {
                out.insert(k, v.data().to_vec());
            }
        }
    }
    out
}

#[test]
fn merge_equals_peft_merge_and_unload_on_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let st = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("merge")
        .arg(testdata().join("checkpoints/tiny-llama-bf16"))
        .arg(testdata().join("peft/adapters/lora"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let stdout = String::from_utf8_lossy(&st.stdout);
    assert!(
        stdout.contains("model.layers.0.self_attn.q_proj  ‖ΔW‖ = "),
        "{stdout}"
    );
    let ours = tensors(&out);
    let want_bytes = std::fs::read(testdata().join("peft/merged-bf16-lora.safetensors")).unwrap();
    let want = SafeTensors::deserialize(&want_bytes).unwrap();
    for (k, v) in want.tensors() {
        assert_eq!(ours[&k], v.data(), "{k}");
    }
    // the untouched tensors are copied unchanged, with the same shard layout
    let base = tensors(&testdata().join("checkpoints/tiny-llama-bf16"));
    assert_eq!(base.len(), ours.len());
    assert_eq!(
        base["model.embed_tokens.weight"],
        ours["model.embed_tokens.weight"]
    );
    assert!(out.join("model.safetensors.index.json").exists());
}

#[test]
fn merge_into_4bit_base_reports_survival() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let st = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .arg("merge")
        .arg(testdata().join("checkpoints/tiny-llama-nf4-dq"))
        .arg(testdata().join("peft/adapters/dora"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(String::from_utf8_lossy(&st.stdout).contains("survived re-quantization"));
    // PEFT's merge_and_unload on the same 4-bit base: identical packed codes
    let ours = tensors(&out);
    let want_bytes = std::fs::read(testdata().join("peft/merged-nf4-dora.safetensors")).unwrap();
    let want = SafeTensors::deserialize(&want_bytes).unwrap();
    let mut n = 0;
    for (k, v) in want.tensors() {
        if let Some(module) = k.strip_suffix(".packed") {
            assert_eq!(ours[&format!("{module}.weight")], v.data(), "{module}");
            n += 1;
        }
    }
    assert_eq!(n, 8);
}

#[test]
fn adapters_that_do_not_fit_name_the_module() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ad = PeftAdapter {
        config: AdapterConfig::new(2, 4.0, TargetModules::List(vec!["up_proj".into()])),
        modules: Default::default(),
        other_tensors: Default::default(),
    };
    let w = AdapterWeights {
        a: vec![0.1; 2 * 64],
        b: vec![0.1; 176 * 2],
        magnitude: None,
    };
    ad.modules
        .insert("model.layers.7.mlp.up_proj".into(), w.clone());
    ad.save(&tmp.path().join("missing")).unwrap();
    ad.modules.clear();
    ad.modules.insert(
        "model.layers.0.mlp.down_proj".into(), // [64, 176]: factors for [176, 64] do not fit
        w,
    );
    ad.save(&tmp.path().join("shape")).unwrap();
    for (name, module) in [
        ("missing", "model.layers.7.mlp.up_proj"),
        ("shape", "model.layers.0.mlp.down_proj"),
    ] {
        let st = Command::new(env!("CARGO_BIN_EXE_qlora"))
            .arg("merge")
            .arg(testdata().join("checkpoints/tiny-llama-bf16"))
            .arg(tmp.path().join(name))
            .arg(tmp.path().join(format!("out-{name}")))
            .output()
            .unwrap();
        assert!(!st.status.success());
        let err = String::from_utf8_lossy(&st.stderr);
        assert!(err.contains(module), "{name}: {err}");
        assert!(!tmp.path().join(format!("out-{name}")).exists());
    }
}

#[test]
fn merge_dtype_converts_the_whole_output() {
    let tmp = tempfile::tempdir().unwrap();
    let base = testdata().join("checkpoints/tiny-llama-bf16");
    let bf16_out = tmp.path().join("bf16");
    let f32_out = tmp.path().join("f32");
    for (out, dtype) in [(&bf16_out, None), (&f32_out, Some("f32"))] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qlora"));
        c.arg("merge")
            .arg(&base)
            .arg(testdata().join("peft/adapters/lora"))
            .arg(out);
        if let Some(d) = dtype {
            c.args(["--dtype", d]);
        }
        let st = c.output().unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    }
    // Every tensor of the f32 output is F32 (merged or not), holding the bf16 output's values
    // widened (the merge rounds to bf16 first only without --dtype: compare the untouched ones
    // exactly and the merged ones loosely).
    let mut n = 0;
    for e in std::fs::read_dir(&f32_out).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            let bytes = std::fs::read(e.path()).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (k, v) in st.tensors() {
                assert_eq!(v.dtype(), safetensors::Dtype::F32, "{k}");
                n += 1;
            }
        }
    }
    assert_eq!(n, tensors(&base).len());
    let bf = tensors(&bf16_out);
    let f = tensors(&f32_out);
    for (k, v) in &bf {
        let wide: Vec<f32> = v
            .chunks(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let got: Vec<f32> = f[k]
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let merged = k.contains("_proj");
        for (a, b) in wide.iter().zip(&got) {
            if merged {
                assert!((a - b).abs() <= 1e-2 * a.abs().max(1e-2), "{k}: {a} vs {b}");
            } else {
                assert_eq!(a, b, "{k}");
            }
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f32_out.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["dtype"], "float32");
    assert_eq!(cfg["model_type"], "llama");
}
