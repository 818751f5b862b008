//! `qlora finetune` on a tiny random Llama with the test tokenizer (testdata/llama/tokenizer):
//! outputs, resume, one-line errors without partial output, SIGTERM clean-up.

use candle_core::{DType, Device};
use qlora_candle::llama::{save_pretrained, varmap_tensors, LlamaConfig, LlamaForCausalLM};
use rustix::process::{kill_process, Pid, Signal};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// A tiny random Llama (vocab 400, hidden 64, 2 layers, 64 positions) with tokenizer.json, and
/// a `.txt` data file.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    let mut cfg = LlamaConfig::tiny(400, 64, 2, 4, 2);
    cfg.max_position_embeddings = 64;
    let (_, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
    save_pretrained(&model, &cfg, &varmap_tensors(&varmap)).unwrap();
    std::fs::copy(
        testdata().join("llama/tokenizer/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    let corpus = std::fs::read_to_string(testdata().join("llama/tokenizer/corpus.txt")).unwrap();
    let data = dir.join("data.txt");
    std::fs::write(&data, &corpus[..3000]).unwrap();
    (model, data)
}

fn qlora(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qlora"));
    c.arg("finetune")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--batch-size", "2", "--lr", "5e-3", "--double-quant"])
        .args(extra);
    if !extra.contains(&"--seq-len") {
        c.args(["--seq-len", "32"]);
    }
    c
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn finetune_writes_the_outputs_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let out = tmp.path().join("out");
    let args = [
        "--steps",
        "4",
        "--save-every",
        "2",
        "--dropout",
        "0.1",
        "--json",
    ];
    let o = run(qlora(&model, &data, &out, &args));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["steps"], 4);
    assert_eq!(summary["losses"].as_array().unwrap().len(), 4);
    assert_eq!(
        summary["eval_loss_reloaded"], summary["eval_loss_after"],
        "4-bit base + adapter read back give the trained loss"
    );
    assert_eq!(
        listing(&out),
        ["adapter", "base-4bit", "merged", "training.json"]
    );
    let ckpts = tmp.path().join("out-checkpoints");
    assert_eq!(listing(&ckpts), ["checkpoint-2", "checkpoint-4"]);
    let adapter = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();

    // Resume from checkpoint-2: the same adapter bytes and losses.
    std::fs::remove_dir_all(ckpts.join("checkpoint-4")).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    let o = run(qlora(
        &model,
        &data,
        &out,
        &[&args[..], &["--resume"]].concat(),
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let resumed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(resumed["resumed_from"], 2);
    assert_eq!(resumed["losses"], summary["losses"]);
    assert!(std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap() == adapter);

    // Text output: a summary, and no progress bar on stdout.
    let out2 = tmp.path().join("out2");
    let o = run(qlora(
        &model,
        &data,
        &out2,
        &["--steps", "1", "--optim", "adamw32bit"],
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("trained 1 steps"), "{text}");
    assert!(text.contains("wrote "), "{text}");
}

/// Runs a failing command: one line on stderr, non-zero status, nothing written next to `out`.
fn fails(c: Command, out: &Path, what: &str) {
    let parent = out.parent().unwrap();
    let before = listing(parent);
    let o = run(c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "should fail: {what}");
    assert!(err.contains(what), "{err:?} should mention {what:?}");
    assert!(!out.exists(), "no partial output for {what}");
    assert_eq!(listing(parent), before, "nothing else written for {what}");
    if o.status.code() == Some(1) {
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    }
}

#[test]
fn finetune_bad_input_is_a_one_line_error_with_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let out = tmp.path().join("out");
    let s = ["--steps", "1"];
    fails(
        qlora(
            &model,
            &data,
            &out,
            &[&s[..], &["--seq-len", "65"]].concat(),
        ),
        &out,
        "longer than max_position_embeddings = 64",
    );
    fails(
        qlora(&model, &tmp.path().join("none.txt"), &out, &s),
        &out,
        "none.txt",
    );
    fails(
        qlora(&tmp.path().join("nomodel"), &data, &out, &s),
        &out,
        "nomodel",
    );
    fails(
        qlora(
            &model,
            &data,
            &out,
            &[&s[..], &["--device", "cuda"]].concat(),
        ),
        &out,
        "no CUDA backend",
    );
    fails(
        qlora(&model, &data, &out, &[&s[..], &["--resume"]].concat()),
        &out,
        "no checkpoint",
    );
    fails(
        qlora(
            &model,
            &data,
            &out,
            &[&s[..], &["--target-modules", "nothing_proj"]].concat(),
        ),
        &out,
        "match no linear layer",
    );
    fails(
        qlora(&model, &data, &out, &[&s[..], &["--rank", "0"]].concat()),
        &out,
        "error:",
    );
    // Bad flags: clap's usage error (status 2).
    fails(
        qlora(&model, &data, &out, &[&s[..], &["--optim", "sgd"]].concat()),
        &out,
        "sgd",
    );
    fails(
        qlora(&model, &data, &out, &["--steps", "1", "--epochs", "1"]),
        &out,
        "cannot be used with",
    );
    // Unknown architecture.
    let odd = tmp.path().join("odd");
    std::fs::create_dir(&odd).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(model.join(f), odd.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    std::fs::write(
        odd.join("config.json"),
        cfg.replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    fails(
        qlora(&odd, &data, &out, &s),
        &out,
        "unsupported model_type \"gpt2\"",
    );
    // Unwritable output: its parent is a file.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let o = run(qlora(&model, &data, &file.join("out"), &s));
    assert!(!o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // An existing output is left alone.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"mine").unwrap();
    let o = run(qlora(&model, &data, &out, &s));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    assert_eq!(listing(&out), ["keep"]);
}

#[test]
fn sigterm_during_training_leaves_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = fixture(tmp.path());
    let out = tmp.path().join("out");
    let mut c = qlora(
        &model,
        &data,
        &out,
        &["--steps", "100000", "--save-every", "1"],
    );
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint: training is under way.
    let first = tmp.path().join("out-checkpoints/checkpoint-1");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !first.exists() {
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = Pid::from_raw(child.id() as i32).unwrap();
    kill_process(pid, Signal::TERM).unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(143),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists());
    // Only complete checkpoints remain: no hidden temporaries anywhere.
    for dir in [tmp.path().to_path_buf(), tmp.path().join("out-checkpoints")] {
        for name in listing(&dir) {
            assert!(
                !name.contains(".tmp-"),
                "leftover {name} in {}",
                dir.display()
            );
        }
    }
    for name in listing(&tmp.path().join("out-checkpoints")) {
        let ck = tmp.path().join("out-checkpoints").join(&name);
        assert!(
            ck.join("trainer_state.json").is_file(),
            "{name} is complete"
        );
        assert!(
            ck.join("optimizer.safetensors").is_file(),
            "{name} is complete"
        );
    }
}
