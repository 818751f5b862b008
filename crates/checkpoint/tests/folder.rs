//! Model folders: the bf16 shards quantized give the folder transformers + bitsandbytes wrote,
//! the transformers folder dequantizes bit for bit to bitsandbytes' reference, re-sharding,
//! atomic failure.

use half::bf16;
use qlora_checkpoint::{
    convert_model, Conversion, ConvertOptions, Entry, Layout, MappedFile, ModelFolder, QuantState,
    QuantizeFileOptions,
};
use qlora_codec::{Dtype, QuantizeOptions};
use std::path::{Path, PathBuf};

fn testdata(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(rel)
}

fn quantize_dq() -> Conversion {
    Conversion::Quantize {
        options: QuantizeFileOptions {
            quant: QuantizeOptions {
                double_quant: true,
                ..QuantizeOptions::qlora()
            },
            ..Default::default()
        },
        compute_dtype: None,
    }
}

fn raw(model: &ModelFolder, key: &str) -> Vec<u8> {
    model.tensor_bytes(key).unwrap().to_vec()
}

fn entries_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn quantizing_the_bf16_folder_gives_the_transformers_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("nf4");
    let report = convert_model(
        &testdata("checkpoints/tiny-llama-bf16"),
        &out,
        &quantize_dq(),
        &ConvertOptions::default(),
    )
    .unwrap();
    // transformers' default max_shard_size: one file, no index, like the reference folder.
    assert_eq!(report.shards, vec!["model.safetensors".to_string()]);
    assert_eq!(
        entries_in(&out),
        ["config.json", "generation_config.json", "model.safetensors"]
    );
    // config.json byte for byte as transformers wrote it (quantization_config included).
    assert_eq!(
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        std::fs::read_to_string(testdata("checkpoints/tiny-llama-nf4-dq/config.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join("generation_config.json")).unwrap(),
        std::fs::read(testdata(
            "checkpoints/tiny-llama-bf16/generation_config.json"
        ))
        .unwrap()
    );
    let ours = ModelFolder::open(&out).unwrap();
    let bnb = ModelFolder::open(testdata("checkpoints/tiny-llama-nf4-dq")).unwrap();
    assert_eq!(ours.layout(), Layout::SingleFile);
    let mut ours_keys = ours.raw_names().to_vec();
    let mut bnb_keys = bnb.raw_names().to_vec();
    ours_keys.sort();
    bnb_keys.sort();
    assert_eq!(ours_keys, bnb_keys);
    let mut code_diffs = Vec::new();
    let mut offsets_differ = 0;
    for key in &ours_keys {
        let (a, b) = (ours.info(key).unwrap(), bnb.info(key).unwrap());
        assert_eq!(
            (a.dtype, &a.shape),
            (b.dtype, &b.shape),
            "{key}: dtype/shape"
        );
        let (x, y) = (raw(&ours, key), raw(&bnb, key));
        if key.ends_with(".quant_state.bitsandbytes__nf4") {
            let (sx, sy) = (
                QuantState::from_json_bytes(&x).unwrap(),
                QuantState::from_json_bytes(&y).unwrap(),
            );
            let (ox, oy) = (sx.nested_offset.unwrap(), sy.nested_offset.unwrap());
            assert!(
                (ox.to_bits() as i64 - oy.to_bits() as i64).abs() <= 1,
                "{key}: offset {ox} vs {oy}"
            );
            if ox.to_bits() != oy.to_bits() {
                offsets_differ += 1;
            } else {
                assert_eq!(x, y, "{key}: JSON bytes");
            }
            assert_eq!(
                QuantState {
                    nested_offset: None,
                    ..sx
                },
                QuantState {
                    nested_offset: None,
                    ..sy
                }
            );
        } else if key.ends_with(".absmax") && a.dtype == safetensors::Dtype::U8 {
            for (j, (p, q)) in x.iter().zip(&y).enumerate() {
                if p != q {
                    code_diffs.push((key.clone(), j, *p, *q));
                }
            }
        } else {
            assert_eq!(x, y, "{key}: bytes");
        }
    }
    // Only the nested code documented in testdata/README.md §2.1 (bnb's approximate CPU
    // quantizer) may differ, plus codes moved by a last-bit offset difference (none here).
    assert!(
        code_diffs
            == vec![(
                "model.layers.0.self_attn.q_proj.weight.absmax".to_string(),
                38,
                162,
                163
            )],
        "nested code differences: {code_diffs:?} ({offsets_differ} offsets differ in the last bit)"
    );
    // Every quantized weight reported, in input order.
    assert_eq!(
        report
            .tensors
            .iter()
            .filter(|r| r.action == qlora_checkpoint::Action::Quantized)
            .count(),
        14
    );
}

#[test]
fn dequantizing_the_transformers_folder_matches_bitsandbytes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    convert_model(
        &testdata("checkpoints/tiny-llama-nf4-dq"),
        &out,
        &Conversion::Dequantize { dtype: None },
        &ConvertOptions::default(),
    )
    .unwrap();
    // quantization_config removed again: the config is the bf16 model's, byte for byte.
    assert_eq!(
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        std::fs::read_to_string(testdata("checkpoints/tiny-llama-bf16/config.json")).unwrap()
    );
    let ours = ModelFolder::open(&out).unwrap();
    let bnb = ModelFolder::open(testdata("checkpoints/tiny-llama-nf4-dq")).unwrap();
    let reference = MappedFile::open(testdata(
        "checkpoints/tiny-llama-nf4-dq.dequant.safetensors",
    ))
    .unwrap();
    let reference = reference.checkpoint().unwrap();
    let mut dequantized = 0;
    for e in bnb.entries() {
        match e {
            Entry::Quantized { name, .. } => {
                let t = ours.info(name).unwrap();
                assert_eq!(t.dtype, safetensors::Dtype::BF16);
                let got: Vec<bf16> = ours.dense_as(name).unwrap();
                let want: Vec<bf16> = reference.dense_as(name).unwrap();
                assert!(
                    got.len() == want.len()
                        && got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}"
                );
                dequantized += 1;
            }
            Entry::Dense { name, .. } => assert_eq!(raw(&ours, name), raw(&bnb, name), "{name}"),
        }
    }
    assert_eq!(dequantized, 14);
    assert_eq!(ours.entries().len(), 21);
}

#[test]
fn resharding_writes_an_index_and_the_same_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    let input = testdata("checkpoints/tiny-llama-bf16");
    convert_model(&input, &single, &quantize_dq(), &ConvertOptions::default()).unwrap();
    let report = convert_model(
        &input,
        &sharded,
        &quantize_dq(),
        &ConvertOptions {
            max_shard_size: 40_000,
            progress: None,
        },
    )
    .unwrap();
    let n = report.shards.len();
    assert!(n >= 3, "{:?}", report.shards);
    assert_eq!(
        report.shards[0],
        format!("model-00001-of-{n:05}.safetensors")
    );
    let a = ModelFolder::open(&single).unwrap();
    let b = ModelFolder::open(&sharded).unwrap();
    assert_eq!(b.layout(), Layout::Sharded);
    // Every shard but a lone oversized tensor's stays within the limit.
    for s in b.shards() {
        let tensors: Vec<_> = b
            .raw_names()
            .iter()
            .filter(|k| b.shard_path(k).unwrap() == s.path())
            .collect();
        let bytes: usize = tensors.iter().map(|k| b.info(k).unwrap().len).sum();
        assert!(
            bytes <= 40_000 || tensors.len() <= 6,
            "{}: {bytes}",
            s.file_name()
        );
    }
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sharded.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let total: u64 = b
        .raw_names()
        .iter()
        .map(|k| b.info(k).unwrap().len as u64)
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    assert_eq!(index["metadata"]["total_parameters"], 125_248);
    assert_eq!(
        index["weight_map"].as_object().unwrap().len(),
        a.raw_names().len()
    );
    let mut ka = a.raw_names().to_vec();
    let mut kb = b.raw_names().to_vec();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb);
    for k in &ka {
        assert_eq!(raw(&a, k), raw(&b, k), "{k}");
    }
    for name in a.entries().iter().map(Entry::name) {
        if let Ok(q) = a.quantized(name) {
            assert_eq!(q, b.quantized(name).unwrap());
        }
    }
    // And back: dequantizing the sharded folder equals dequantizing the single file.
    let back_a = tmp.path().join("back-a");
    let back_b = tmp.path().join("back-b");
    let deq = Conversion::Dequantize {
        dtype: Some(Dtype::F32),
    };
    convert_model(&single, &back_a, &deq, &ConvertOptions::default()).unwrap();
    convert_model(&sharded, &back_b, &deq, &ConvertOptions::default()).unwrap();
    let (x, y) = (
        ModelFolder::open(&back_a).unwrap(),
        ModelFolder::open(&back_b).unwrap(),
    );
    for k in x.raw_names() {
        assert_eq!(raw(&x, k), raw(&y, k), "{k}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_corrupt_second_shard_fails_cleanly_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    copy_dir(&testdata("checkpoints/tiny-llama-bf16"), &input);
    let shard2 = input.join("model-00002-of-00003.safetensors");
    let bytes = std::fs::read(&shard2).unwrap();
    std::fs::write(&shard2, &bytes[..bytes.len() - 100]).unwrap();
    let out = tmp.path().join("out");
    let err = convert_model(&input, &out, &quantize_dq(), &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model-00002-of-00003.safetensors") && err.contains("truncated"),
        "{err}"
    );
    assert_eq!(entries_in(tmp.path()), ["in"]);
    // A shard whose bytes are fine but holds NaN fails mid-conversion, after other shards were
    // written: still nothing left behind.
    std::fs::write(&shard2, &bytes).unwrap();
    let ck = ModelFolder::open(&input).unwrap();
    let key = "model.layers.1.self_attn.q_proj.weight";
    let t = ck.info(key).unwrap().clone();
    drop(ck);
    let mut bytes = bytes.clone();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let _ = header;
    let at = t.offset as usize + 2 * 100;
    bytes[at..at + 2].copy_from_slice(&bf16::NAN.to_le_bytes());
    std::fs::write(&shard2, &bytes).unwrap();
    let err = convert_model(&input, &out, &quantize_dq(), &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(key) && err.contains("element 100 is NaN"),
        "{err}"
    );
    assert_eq!(entries_in(tmp.path()), ["in"]);
}

#[test]
fn index_problems_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    copy_dir(&testdata("checkpoints/tiny-llama-bf16"), &input);
    let index_path = input.join("model.safetensors.index.json");
    let original = std::fs::read_to_string(&index_path).unwrap();
    let cases: [(String, &str); 6] = [
        (
            original.replace(
                "\"lm_head.weight\": \"model-00003-of-00003.safetensors\"",
                "\"lm_head.weight\": \"model-00002-of-00003.safetensors\"",
            ),
            "key \"weight_map.lm_head.weight\": says \"model-00002-of-00003.safetensors\" but the tensor is in \"model-00003-of-00003.safetensors\"",
        ),
        (
            original.replace(
                "\"model.norm.weight\": \"model-00003-of-00003.safetensors\"",
                "\"model.norm.weight\": \"model-00004-of-00003.safetensors\"",
            ),
            "names shard \"model-00004-of-00003.safetensors\" which cannot be opened",
        ),
        (
            original.replace(
                "\"model.norm.weight\": \"model-00003-of-00003.safetensors\"",
                "\"model.norm.weight\": \"../x.safetensors\"",
            ),
            "is not a .safetensors file name in the same folder",
        ),
        (
            original.replace("\"weight_map\"", "\"weights\""),
            "key \"weight_map\": missing",
        ),
        (
            original.replace("\"total_size\": 250496", "\"total_size\": -1"),
            "key \"metadata.total_size\": -1 is not a non-negative integer",
        ),
        (
            original.replacen(
                "\"lm_head.weight\"",
                "\"lm_head.weight\": \"model-00003-of-00003.safetensors\",\n    \"lm_head.weight\"",
                1,
            ),
            "duplicate key \"lm_head.weight\"",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&index_path, &text).unwrap();
        let err = ModelFolder::open(&input).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors.index.json") && err.contains(want),
            "want {want:?}, got {err}"
        );
    }
    // A tensor listed in the index but absent from its shard.
    std::fs::write(
        &index_path,
        original.replace(
            "\"model.norm.weight\"",
            "\"model.extra.weight\": \"model-00003-of-00003.safetensors\",\n    \"model.norm.weight\"",
        ),
    )
    .unwrap();
    let err = ModelFolder::open(&input).unwrap_err().to_string();
    assert!(
        err.contains("which has no tensor \"model.extra.weight\""),
        "{err}"
    );
}

#[test]
fn config_problems_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    copy_dir(&testdata("checkpoints/tiny-llama-nf4-dq"), &input);
    let cpath = input.join("config.json");
    let original = std::fs::read_to_string(&cpath).unwrap();
    for (text, want) in [
        ("[1, 2]".to_string(), "top level is a list, not an object"),
        (
            original.replace("\"dtype\": \"bfloat16\"", "\"dtype\": 16"),
            "key \"dtype\": is a number",
        ),
        (
            original.replace(
                "\"bnb_4bit_quant_type\": \"nf4\"",
                "\"bnb_4bit_quant_type\": \"nf5\"",
            ),
            "key \"quantization_config.bnb_4bit_quant_type\": \"nf5\" is not",
        ),
        (
            original.replace("\"llm_int8_threshold\": 6.0", "\"llm_int8_threshold\": NaN"),
            "config.json: ",
        ),
        (original[..100].to_string(), "EOF"),
    ] {
        std::fs::write(&cpath, &text).unwrap();
        let err = ModelFolder::open(&input).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains(want),
            "want {want:?}, got {err}"
        );
    }
    // Quantizing an already-quantized folder is refused, naming the key.
    std::fs::write(&cpath, &original).unwrap();
    let err = convert_model(
        &input,
        &tmp.path().join("out"),
        &quantize_dq(),
        &ConvertOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("quantization_config") && err.contains("already quantized"),
        "{err}"
    );
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn selection_overrides_are_recorded_in_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let input = testdata("checkpoints/tiny-llama-bf16");
    let quantize = |only: &[&str], skip: &[&str]| Conversion::Quantize {
        options: QuantizeFileOptions {
            quant: QuantizeOptions::qlora(),
            selection: qlora_checkpoint::Selection::new(
                &only.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                &skip.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap(),
            allow_non_finite: false,
            dq_offsets: Default::default(),
        },
        compute_dtype: Some(Dtype::F32),
    };
    let skip_modules = |dir: &Path| {
        let c = ModelFolder::open(dir).unwrap().config().unwrap().clone();
        let q = c["quantization_config"].as_object().unwrap().clone();
        assert_eq!(q["bnb_4bit_compute_dtype"], "float32");
        assert_eq!(q["bnb_4bit_use_double_quant"], true);
        q["llm_int8_skip_modules"].clone()
    };
    // --skip mlp: the MLP projections (and lm_head, as by default) stay dense and are named.
    let out = tmp.path().join("skip");
    convert_model(
        &input,
        &out,
        &quantize(&[], &["mlp"]),
        &ConvertOptions::default(),
    )
    .unwrap();
    let skipped = skip_modules(&out);
    let mut skipped: Vec<&str> = skipped
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    skipped.sort();
    assert_eq!(skipped.len(), 2 * 3 + 2, "{skipped:?}");
    assert!(skipped.contains(&"lm_head") && skipped.contains(&"model.layers.1.mlp.up_proj"));
    let m = ModelFolder::open(&out).unwrap();
    assert!(m.quantized("model.layers.0.mlp.up_proj.weight").is_err());
    assert!(m
        .quantized("model.layers.0.self_attn.q_proj.weight")
        .is_ok());
    // The default selection writes null, like BitsAndBytesConfig.
    let out = tmp.path().join("default");
    convert_model(
        &input,
        &out,
        &quantize(&[], &[]),
        &ConvertOptions::default(),
    )
    .unwrap();
    assert_eq!(skip_modules(&out), serde_json::Value::Null);
    // An output folder inside the input folder does not copy itself.
    let inner_in = tmp.path().join("in");
    copy_dir(&input, &inner_in);
    let inner_out = inner_in.join("nf4");
    convert_model(
        &inner_in,
        &inner_out,
        &quantize(&[], &[]),
        &ConvertOptions::default(),
    )
    .unwrap();
    assert_eq!(
        entries_in(&inner_out),
        ["config.json", "generation_config.json", "model.safetensors"]
    );
}

#[test]
fn progress_counts_every_input_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let input = testdata("checkpoints/tiny-llama-bf16");
    let total = qlora_checkpoint::input_bytes(&ModelFolder::open(&input).unwrap());
    assert_eq!(total, 250_496);
    let seen = std::sync::Mutex::new(Vec::new());
    let progress = |done: u64| seen.lock().unwrap().push(done);
    convert_model(
        &input,
        &tmp.path().join("out"),
        &quantize_dq(),
        &ConvertOptions {
            max_shard_size: 100_000,
            progress: Some(&progress),
        },
    )
    .unwrap();
    let seen = seen.into_inner().unwrap();
    // One call per logical tensor, counting up to the total.
    assert_eq!(seen.len(), 21);
    assert_eq!(seen.iter().max(), Some(&total));
}
