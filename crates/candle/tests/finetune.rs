//! The QLoRA fine-tuning pipeline on a tiny random Llama: exact resume from checkpoints,
//! interrupted saves never read, outputs read back, bad input refused before any output.

use candle_core::{DType, Device};
use qlora_candle::data::{BpeTokenizer, TokenDataset};
use qlora_candle::finetune::{
    finetune, latest_checkpoint, FinetuneError, FinetuneOptions, LrScheduleKind, OptimKind,
    QLoraConfig, QLoraModel, TrainConfig, Trainer,
};
use qlora_candle::llama::{save_pretrained, varmap_tensors, LlamaConfig, LlamaForCausalLM};
use qlora_lora::peft::{PeftAdapter, TargetModules};
use std::path::{Path, PathBuf};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// A tiny random Llama (vocab 400, hidden 64, 2 layers, GQA) with the test tokenizer, and a
/// `.txt` data file, under `dir`.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    let mut cfg = LlamaConfig::tiny(400, 64, 2, 4, 2);
    cfg.max_position_embeddings = 64;
    cfg.extra.insert("eos_token_id".into(), 0.into());
    let (_, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &Device::Cpu, 3).unwrap();
    save_pretrained(&model, &cfg, &varmap_tensors(&varmap)).unwrap();
    let tok = testdata().join("llama/tokenizer/tokenizer.json");
    std::fs::copy(&tok, model.join("tokenizer.json")).unwrap();
    let corpus = std::fs::read_to_string(testdata().join("llama/tokenizer/corpus.txt")).unwrap();
    let data = dir.join("data.txt");
    std::fs::write(&data, &corpus[..3000]).unwrap();
    (model, data)
}

fn qlora() -> QLoraConfig {
    QLoraConfig {
        dropout: 0.1,
        target_modules: TargetModules::List(vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ]),
        init_seed: 11,
        ..QLoraConfig::default()
    }
}

fn train_config(save_every: Option<u64>) -> TrainConfig {
    TrainConfig {
        optim: OptimKind::PagedAdamW8bit,
        lr: 5e-3,
        min_8bit_size: 256,
        warmup_steps: 2,
        schedule: LrScheduleKind::Cosine,
        max_grad_norm: Some(0.3),
        batch_size: 3,
        seed: 5,
        save_every,
        ..TrainConfig::default()
    }
}

fn dataset(model_dir: &Path, data: &Path) -> TokenDataset {
    let tok = BpeTokenizer::from_file(model_dir.join("tokenizer.json")).unwrap();
    TokenDataset::from_file(&tok, data, 32, Some(0)).unwrap()
}

fn adapter_bytes(model: &QLoraModel, dir: &Path) -> Vec<u8> {
    model.save_adapter(dir).unwrap();
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn resume_gives_the_same_adapter_and_losses_as_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(tmp.path());
    let ds = dataset(&model_dir, &data);
    let k = 4;
    let total = 2 * k;
    assert!(
        ds.len() > 3,
        "several batches per epoch ({} examples)",
        ds.len()
    );

    // Straight: 2k steps (crossing an epoch boundary: the dataset has few batches).
    let straight = QLoraModel::from_pretrained(&model_dir, &qlora(), &Device::Cpu).unwrap();
    let mut t1 = Trainer::new(&straight, train_config(None), total).unwrap();
    t1.train(&straight, &ds, None, |_| true).unwrap();
    let want = adapter_bytes(&straight, &tmp.path().join("a1"));

    // Interrupted after k steps (a checkpoint is written when the callback stops the run).
    let ckpts = tmp.path().join("ckpts");
    let first = QLoraModel::from_pretrained(&model_dir, &qlora(), &Device::Cpu).unwrap();
    let mut t2 = Trainer::new(&first, train_config(Some(3)), total).unwrap();
    t2.train(&first, &ds, Some(&ckpts), |r| r.step < k).unwrap();
    assert_eq!(t2.steps_done(), k);
    assert!(ckpts.join("checkpoint-3").is_dir() && ckpts.join("checkpoint-4").is_dir());
    drop(first);

    // A fresh process: new model (fresh adapters), resume from the latest checkpoint.
    let second = QLoraModel::from_pretrained(&model_dir, &qlora(), &Device::Cpu).unwrap();
    let mut t3 = Trainer::new(&second, train_config(Some(3)), total).unwrap();
    let latest = latest_checkpoint(&ckpts).unwrap().unwrap();
    assert_eq!(latest, ckpts.join("checkpoint-4"));
    t3.resume(&second, &latest).unwrap();
    assert_eq!(t3.steps_done(), k);
    t3.train(&second, &ds, Some(&ckpts), |_| true).unwrap();
    let got = adapter_bytes(&second, &tmp.path().join("a2"));

    assert_eq!(t1.losses(), t3.losses(), "per-step losses");
    assert!(got == want, "adapter bytes differ after resume");
    // The loss went down and the adapters moved.
    assert!(t1.losses()[total as usize - 1] < t1.losses()[0]);
    let init = QLoraModel::from_pretrained(&model_dir, &qlora(), &Device::Cpu).unwrap();
    assert!(adapter_bytes(&init, &tmp.path().join("a0")) != want);
}

#[test]
fn a_half_written_checkpoint_is_never_read_and_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(tmp.path());
    let ds = dataset(&model_dir, &data);
    let ckpts = tmp.path().join("ckpts");
    let model = QLoraModel::from_pretrained(&model_dir, &qlora(), &Device::Cpu).unwrap();
    let mut t = Trainer::new(&model, train_config(Some(2)), 4).unwrap();
    t.train(&model, &ds, Some(&ckpts), |r| r.step < 2).unwrap();
    // What a run killed (SIGKILL) while saving checkpoint-4 leaves: a hidden temporary of a
    // process that no longer exists, with a newer step and a garbage state.
    let leftover = ckpts.join(".checkpoint-4.tmp-999999999");
    std::fs::create_dir_all(leftover.join("adapter")).unwrap();
    std::fs::write(leftover.join("trainer_state.json"), "{\"step\": 4, trunc").unwrap();
    // A visible folder that is not a checkpoint is ignored too.
    std::fs::create_dir_all(ckpts.join("checkpoint-9x")).unwrap();
    assert_eq!(
        latest_checkpoint(&ckpts).unwrap().unwrap(),
        ckpts.join("checkpoint-2")
    );

    let model2 = QLoraModel::from_pretrained(&model_dir, &qlora(), &Device::Cpu).unwrap();
    let mut t2 = Trainer::new(&model2, train_config(Some(2)), 4).unwrap();
    t2.resume(&model2, &ckpts.join("checkpoint-2")).unwrap();
    t2.train(&model2, &ds, Some(&ckpts), |_| true).unwrap();
    assert!(ckpts.join("checkpoint-4/trainer_state.json").is_file());
    assert!(
        !leftover.exists(),
        "the stale temporary is removed by the next save"
    );
}

#[test]
fn resume_refuses_a_checkpoint_of_other_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(tmp.path());
    let ds = dataset(&model_dir, &data);
    let ckpts = tmp.path().join("ckpts");
    let model = QLoraModel::from_pretrained(&model_dir, &qlora(), &Device::Cpu).unwrap();
    let mut t = Trainer::new(&model, train_config(Some(1)), 2).unwrap();
    t.train(&model, &ds, Some(&ckpts), |r| r.step < 1).unwrap();
    let other = TrainConfig {
        lr: 1e-3,
        ..train_config(Some(1))
    };
    let mut t2 = Trainer::new(&model, other, 2).unwrap();
    let err = t2.resume(&model, &ckpts.join("checkpoint-1")).unwrap_err();
    assert!(matches!(err, FinetuneError::BadCheckpoint { .. }), "{err}");
    // A corrupt state file is an error, not a panic.
    std::fs::write(
        ckpts.join("checkpoint-1/optimizer.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let mut t3 = Trainer::new(&model, train_config(Some(1)), 2).unwrap();
    assert!(t3.resume(&model, &ckpts.join("checkpoint-1")).is_err());
}

fn options(tmp: &Path, model_dir: &Path, data: &Path, out: &str) -> FinetuneOptions {
    FinetuneOptions {
        model_dir: model_dir.to_path_buf(),
        data: data.to_path_buf(),
        out: tmp.join(out),
        qlora: qlora(),
        train: train_config(Some(2)),
        steps: Some(4),
        epochs: None,
        seq_len: 32,
        resume: false,
        merged_dtype: DType::BF16,
        device: Device::Cpu,
    }
}

#[test]
fn finetune_writes_outputs_that_read_back_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(tmp.path());
    let opts = options(tmp.path(), &model_dir, &data, "out");
    let mut steps = 0;
    let s = finetune(&opts, |e| {
        if let qlora_candle::finetune::FinetuneEvent::Step(_) = e {
            steps += 1
        }
    })
    .unwrap();
    assert_eq!((steps, s.steps, s.losses.len()), (4, 4, 4));
    assert!(s.eval_loss_after < s.eval_loss_before);
    assert_eq!(s.eval_loss_reloaded.to_bits(), s.eval_loss_after.to_bits());
    let out = tmp.path().join("out");
    // The adapter is a PEFT folder with the targeted modules.
    let adapter = PeftAdapter::load(&out.join("adapter")).unwrap();
    assert_eq!(adapter.modules.len(), 2 * 3);
    // The 4-bit base is a transformers/bitsandbytes folder.
    let cfg = LlamaConfig::from_file(out.join("base-4bit/config.json")).unwrap();
    assert_eq!(
        cfg.extra["quantization_config"]["bnb_4bit_quant_type"],
        serde_json::json!("nf4")
    );
    let folder = qlora_checkpoint::ModelFolder::open(out.join("base-4bit")).unwrap();
    assert_eq!(folder.quantized_tensors().count(), 2 * 7);
    // The merged model is dense bf16, with the tokenizer.
    let merged = LlamaConfig::from_file(out.join("merged/config.json")).unwrap();
    assert_eq!(merged.dtype.as_deref(), Some("bfloat16"));
    assert!(!merged.extra.contains_key("quantization_config"));
    let t = qlora_candle::llama::load_safetensors(out.join("merged"), &Device::Cpu).unwrap();
    assert!(t.values().all(|t| t.dtype() == DType::BF16));
    assert!(out.join("merged/tokenizer.json").is_file());
    assert!(out.join("base-4bit/tokenizer.json").is_file());
    assert!(out.join("training.json").is_file());

    // Resume: drop the last checkpoint and the output, run again with resume.
    let ckpts = opts.checkpoint_dir();
    assert!(ckpts.join("checkpoint-4").is_dir());
    std::fs::remove_dir_all(ckpts.join("checkpoint-4")).unwrap();
    let first_adapter = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    let resumed = finetune(
        &FinetuneOptions {
            resume: true,
            ..opts.clone()
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(resumed.resumed_from, 2);
    assert_eq!(resumed.losses, s.losses);
    assert!(std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap() == first_adapter);
}

#[test]
fn finetune_refuses_bad_input_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, data) = fixture(tmp.path());
    let check = |opts: FinetuneOptions, what: &str| {
        let err = finetune(&opts, |_| {}).unwrap_err().to_string();
        assert!(err.contains(what), "{err:?} should mention {what:?}");
        assert!(!opts.out.exists());
        let leftovers: Vec<_> = std::fs::read_dir(opts.out.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
    };
    let base = options(tmp.path(), &model_dir, &data, "out");
    check(
        FinetuneOptions {
            seq_len: 65,
            ..base.clone()
        },
        "max_position_embeddings = 64",
    );
    check(
        FinetuneOptions {
            data: tmp.path().join("missing.txt"),
            ..base.clone()
        },
        "missing.txt",
    );
    check(
        FinetuneOptions {
            model_dir: tmp.path().join("nope"),
            ..base.clone()
        },
        "nope",
    );
    check(
        FinetuneOptions {
            resume: true,
            ..base.clone()
        },
        "no checkpoint",
    );
    let mut bad = base.clone();
    bad.qlora.target_modules = TargetModules::List(vec!["nothing_proj".into()]);
    check(bad, "match no linear layer");
    let csv = tmp.path().join("data.csv");
    std::fs::write(&csv, "a,b").unwrap();
    check(
        FinetuneOptions {
            data: csv,
            ..base.clone()
        },
        "data.csv",
    );
    // An unknown architecture.
    let odd = tmp.path().join("odd");
    std::fs::create_dir(&odd).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(model_dir.join(f), odd.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(model_dir.join("config.json")).unwrap();
    std::fs::write(
        odd.join("config.json"),
        text.replace("\"llama\"", "\"gpt2\""),
    )
    .unwrap();
    check(
        FinetuneOptions {
            model_dir: odd,
            ..base.clone()
        },
        "gpt2",
    );
    // An existing output is not touched.
    std::fs::create_dir(&base.out).unwrap();
    let err = finetune(&base, |_| {}).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn memory_report_counts_the_parts() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, _) = fixture(tmp.path());
    let m = QLoraModel::from_pretrained(&model_dir, &QLoraConfig::default(), &Device::Cpu).unwrap();
    let r = m.memory();
    let cfg = m.config();
    let linear: usize = cfg
        .parameter_shapes()
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.") && n.contains("_proj"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(r.base_4bit_parameters, linear);
    assert_eq!(r.parameters, linear + r.dense_bytes / 4);
    // NF4 + double quant: 4.127 bits per weight.
    let bits = 8.0 * r.base_4bit_bytes as f64 / linear as f64;
    assert!((bits - 4.127).abs() < 0.01, "{bits}");
    // r 8 on all 7 projections of 2 layers: A [8, in] + B [out, 8].
    let (h, i, kv) = (64, cfg.intermediate_size, 2 * 16);
    let per_layer = 8 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h));
    assert_eq!(r.trainable_parameters, 2 * per_layer);
}
