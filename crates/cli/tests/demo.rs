//! End-to-end test of `qlora demo`: a shortened run must lower the loss on the fine-tune text by
//! a real margin, write the adapter, base and merged model, and reload them to the same loss.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn qlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .output()
        .expect("the qlora binary runs")
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

#[test]
fn short_demo_learns_saves_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    let o = qlora(&[
        "demo",
        "--steps",
        "200",
        "--pretrain-steps",
        "300",
        "--seed",
        "7",
        "--out",
        out_s,
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "demo failed: {stderr}");
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "--json prints one line");
    let s: Value = serde_json::from_str(stdout.trim()).unwrap();

    // The adapter learned the new text: well below the 4-bit base's loss.
    let before = num(&s, "loss_before");
    let after = num(&s, "loss_after");
    assert!(
        before.is_finite() && after.is_finite() && after > 0.0,
        "{s}"
    );
    assert!(
        after < before - 0.2,
        "loss fell only from {before} to {after}"
    );
    // Quantizing the bf16 base to NF4 costs little.
    assert!((num(&s, "loss_base_bf16") - before).abs() < 0.1, "{s}");

    // Reloading the adapter over the saved 4-bit base reproduces the loss exactly; the merged
    // bf16 model within bf16 rounding.
    assert_eq!(s["reload_ok"], Value::Bool(true), "{s}");
    assert_eq!(num(&s["reload"], "adapter_loss"), after);
    assert!((num(&s["reload"], "merged_bf16_loss") - after).abs() <= 1e-2);

    // Memory: NF4 + DQ < NF4 < bf16 for the base; 8-bit states < 32-bit states.
    let m = &s["memory_bytes"];
    let bf16 = num(m, "base_linear_bf16");
    let nf4 = num(m, "base_linear_nf4");
    let nf4_dq = num(m, "base_linear_nf4_dq");
    assert!(nf4_dq < nf4 && nf4 < bf16 / 3.5, "{m}");
    assert_eq!(bf16, 2.0 * (256.0 * 256.0 * 2.0));
    assert!(
        num(m, "optimizer_8bit") * 3.0 < num(m, "optimizer_32bit"),
        "{m}"
    );
    assert_eq!(s["finetune"]["rank"], Value::from(16));
    let table = s["memory_table"]
        .as_array()
        .expect("memory_table is a list");
    assert_eq!(table.len(), m.as_object().unwrap().len());
    assert!(table
        .iter()
        .all(|r| r["component"].is_string() && r["bytes"].is_u64()));

    // The files are there and are what they say.
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "base/model.safetensors",
        "merged/model.safetensors",
        "summary.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 16);
    assert_eq!(cfg["lora_alpha"], 32);
    assert_eq!(cfg["lora_dropout"], 0.05);
    assert_eq!(cfg["target_modules"], serde_json::json!(["fc1", "fc2"]));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["loss_after"], s["loss_after"]);
    // No temporary files are left behind.
    for sub in ["", "adapter", "base", "merged"] {
        for e in std::fs::read_dir(out.join(sub)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "leftover {sub}/{name}");
        }
    }
}

fn assert_clean_failure(o: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "should fail: {stderr}");
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_options_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();
    assert_clean_failure(&qlora(&["demo", "--rank", "0", "--out", out_s]), "--rank");
    assert_clean_failure(&qlora(&["demo", "--rank", "257", "--out", out_s]), "--rank");
    assert_clean_failure(&qlora(&["demo", "--steps", "0", "--out", out_s]), "--steps");
    assert!(
        !Path::new(&out).exists(),
        "nothing is written for bad options"
    );
}

#[test]
fn unwritable_output_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let o = qlora(&[
        "demo",
        "--steps",
        "1",
        "--pretrain-steps",
        "1",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "a-file");
}
