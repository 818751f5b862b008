//! `qlora_candle::data`: the BPE tokenizer against Python `tokenizers` (testdata/llama/tokenizer,
//! from tools/gen_llama_vectors.py), datasets from .txt and .jsonl, batching, errors.

use std::path::{Path, PathBuf};

use candle_core::Device;
use qlora_candle::data::{BpeTokenizer, DataError, TokenDataset};
use qlora_candle::llama::IGNORE_INDEX;

fn tokdir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/llama/tokenizer")
}

fn samples() -> (Vec<String>, Vec<Vec<u32>>) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tokdir().join("samples.json")).unwrap())
            .unwrap();
    let samples = v["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let ids = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    (samples, ids)
}

fn corpus() -> String {
    std::fs::read_to_string(tokdir().join("corpus.txt")).unwrap()
}

fn trained() -> BpeTokenizer {
    BpeTokenizer::train(&[corpus().as_str()], 400, &["<|endoftext|>"]).unwrap()
}

#[test]
fn trained_tokenizer_equals_python_tokenizers() {
    let ours = trained();
    let tmp = tempfile::tempdir().unwrap();
    ours.save(tmp.path().join("tokenizer.json")).unwrap();
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (a, b) = (
        read(tmp.path().join("tokenizer.json")),
        read(tokdir().join("tokenizer.json")),
    );
    assert_eq!(a["model"]["vocab"], b["model"]["vocab"]);
    assert_eq!(a["model"]["merges"], b["model"]["merges"]);
    assert_eq!(a, b, "whole tokenizer.json");
    assert_eq!(ours.vocab_size(), 400);
    assert_eq!(ours.token_id("<|endoftext|>"), Some(0));
    let (texts, ids) = samples();
    for (t, want) in texts.iter().zip(&ids) {
        assert_eq!(&ours.encode(t).unwrap(), want, "{t:?}");
    }
}

#[test]
fn python_tokenizer_json_loads_and_round_trips() {
    let theirs = BpeTokenizer::from_file(tokdir().join("tokenizer.json")).unwrap();
    let (texts, ids) = samples();
    for (t, want) in texts.iter().zip(&ids) {
        let got = theirs.encode(t).unwrap();
        assert_eq!(&got, want, "{t:?}");
        assert_eq!(&theirs.decode(&got).unwrap(), t);
    }
    let tmp = tempfile::tempdir().unwrap();
    theirs
        .save_pretrained(tmp.path(), Some("<|endoftext|>"), 128)
        .unwrap();
    let back = BpeTokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
    assert_eq!(back.encode(&texts[1]).unwrap(), ids[1]);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["eos_token"], "<|endoftext|>");
}

#[test]
fn tokenizer_errors() {
    let msg = BpeTokenizer::train(&["abc abc"], 100, &[])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("vocab_size 100"), "{msg}");
    assert!(matches!(
        BpeTokenizer::train(&[""], 300, &[]),
        Err(DataError::Empty(_))
    ));
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("tokenizer.json");
    std::fs::write(&p, "{not json").unwrap();
    let msg = BpeTokenizer::from_file(&p).unwrap_err().to_string();
    assert!(msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn text_is_packed_into_seq_len_chunks() {
    let tok = trained();
    let text = corpus();
    let ids = tok.encode(&text).unwrap();
    let data = TokenDataset::from_text(&tok, &text, 64).unwrap();
    assert_eq!(
        data.len(),
        ids.len().div_ceil(64) - usize::from(ids.len() % 64 == 1)
    );
    let flat: Vec<u32> = data
        .examples()
        .iter()
        .flat_map(|e| e.input_ids.clone())
        .collect();
    assert_eq!(flat[..], ids[..flat.len()]);
    for e in data.examples() {
        assert!(e.input_ids.len() <= 64 && e.input_ids.len() >= 2);
        let l: Vec<u32> = e.labels.iter().map(|&l| l as u32).collect();
        assert_eq!(l, e.input_ids);
    }
}

#[test]
fn jsonl_prompts_are_not_scored() {
    let tok = trained();
    let eos = tok.token_id("<|endoftext|>");
    let content = concat!(
        "{\"prompt\": \"First Citizen:\\n\", \"completion\": \"Speak, speak.\"}\n",
        "\n",
        "{\"text\": \"You are all resolved rather to die than to famish?\"}\n",
    );
    let data = TokenDataset::from_jsonl(&tok, content, 32, eos).unwrap();
    assert_eq!(data.len(), 2);
    let p = tok.encode("First Citizen:\n").unwrap();
    let c = tok.encode("Speak, speak.").unwrap();
    let e = &data.examples()[0];
    assert_eq!(e.input_ids.len(), p.len() + c.len() + 1);
    assert!(e.labels[..p.len()].iter().all(|&l| l == IGNORE_INDEX));
    assert_eq!(e.labels[p.len()], i64::from(c[0]));
    assert_eq!(*e.input_ids.last().unwrap(), 0);
    assert_eq!(
        data.num_labelled(),
        c.len() + 1 + data.examples()[1].input_ids.len()
    );
    // Completions are truncated to seq_len.
    let data = TokenDataset::from_jsonl(&tok, content, p.len() + 2, eos).unwrap();
    assert_eq!(data.examples()[0].input_ids.len(), p.len() + 2);
}

#[test]
fn jsonl_errors_name_the_line() {
    let tok = trained();
    let cases = [
        ("{\"text\": \"a b\"}\n{\"text\": \"x\", \"label\": 3}\n", "line 2: unknown field \"label\""),
        ("{\"text\": \"a b\"}\n\n{\"text\": \"x\"\n", "line 3: invalid JSON"),
        ("[1, 2]\n", "line 1: not a JSON object"),
        ("{\"prompt\": \"a b\"}\n", "line 1: a record needs"),
        ("{\"text\": 5}\n", "line 1: field \"text\" is not a string"),
        ("{\"text\": \"a\", \"prompt\": \"b\", \"completion\": \"c\"}\n", "cannot be combined"),
        ("{\"prompt\": \"First Citizen: First Citizen: First Citizen:\", \"completion\": \"x\"}\n", "no completion token"),
    ];
    for (content, want) in cases {
        let msg = TokenDataset::from_jsonl(&tok, content, 4, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(want), "{content:?}: {msg}");
    }
    assert!(matches!(
        TokenDataset::from_jsonl(&tok, "\n\n", 8, None),
        Err(DataError::Empty(_))
    ));
    assert!(matches!(
        TokenDataset::from_text(&tok, "a", 8),
        Err(DataError::Empty(_))
    ));
    assert!(TokenDataset::from_text(&tok, "a b c", 1).is_err());
}

#[test]
fn files_by_extension() {
    let tok = trained();
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("a.txt");
    std::fs::write(&txt, corpus()).unwrap();
    assert!(TokenDataset::from_file(&tok, &txt, 32, None).unwrap().len() > 10);
    let jsonl = tmp.path().join("a.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"hear me speak\"}\n{\"txt\": \"x\"}\n").unwrap();
    let msg = TokenDataset::from_file(&tok, &jsonl, 32, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("line 2") && msg.contains("\"txt\""), "{msg}");
    let csv = tmp.path().join("a.csv");
    std::fs::write(&csv, "x").unwrap();
    assert!(matches!(
        TokenDataset::from_file(&tok, &csv, 32, None),
        Err(DataError::UnsupportedFile(_))
    ));
    let msg = TokenDataset::from_file(&tok, tmp.path().join("missing.txt"), 32, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing.txt"), "{msg}");
}

#[test]
fn batches_are_seeded_shuffles_padded_with_ignored_labels() {
    let tok = trained();
    let content = (0..10)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Q{i}:\", \"completion\": \"{}\"}}\n",
                "speak ".repeat(i + 1)
            )
        })
        .collect::<String>();
    let data = TokenDataset::from_jsonl(&tok, &content, 64, None).unwrap();
    let a = data.epoch_order(42, 0);
    assert_eq!(a, data.epoch_order(42, 0));
    assert_ne!(a, data.epoch_order(42, 1));
    assert_ne!(a, data.epoch_order(43, 0));
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    let batches = data.batches(4, 42, 0, &Device::Cpu).unwrap();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[2].input_ids.dims()[0], 2);
    for (b, idx) in batches.iter().zip(a.chunks(4)) {
        let ids: Vec<Vec<u32>> = b.input_ids.to_vec2().unwrap();
        let labels: Vec<Vec<i64>> = b.labels.to_vec2().unwrap();
        for ((row_ids, row_labels), &i) in ids.iter().zip(&labels).zip(idx) {
            let e = &data.examples()[i];
            let n = e.input_ids.len();
            assert_eq!(row_ids[..n], e.input_ids[..]);
            assert_eq!(row_labels[..n], e.labels[..]);
            assert!(row_labels[n..].iter().all(|&l| l == IGNORE_INDEX));
        }
    }
    assert!(data.batches(0, 1, 0, &Device::Cpu).is_err());
}
