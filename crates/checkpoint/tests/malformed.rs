//! The hand-made broken files of `testdata/malformed/` (written by `tools/gen_malformed.py`):
//! each is rejected with its specific error, naming the file, and never panics.

use qlora_checkpoint::{Entry, MappedFile, ModelFolder};
use std::path::PathBuf;

fn corpus() -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/malformed");
    let expected: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(dir.join("EXPECTED.json")).unwrap()).unwrap();
    let cases: Vec<(PathBuf, String)> = expected
        .into_iter()
        .map(|(k, v)| (dir.join(k), v.as_str().unwrap().to_string()))
        .collect();
    // Every file of the folder has an expectation.
    let files = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != "EXPECTED.json")
        .count();
    assert_eq!(files, cases.len());
    assert!(cases.len() >= 25);
    cases
}

/// Open and read every 4-bit group; the first error.
fn folder_error(path: &PathBuf) -> Option<String> {
    let model = match ModelFolder::open(path) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    for e in model.entries() {
        if let Entry::Quantized { name, .. } = e {
            if let Err(e) = model.quantized(name) {
                return Some(e.to_string());
            }
        }
    }
    None
}

fn mapped_error(path: &PathBuf) -> Option<String> {
    let mapped = match MappedFile::open(path) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    let ck = match mapped.checkpoint() {
        Ok(c) => c,
        Err(e) => return Some(e.to_string()),
    };
    for e in ck.entries() {
        if let Entry::Quantized { name, .. } = e {
            if let Err(e) = ck.quantized(name) {
                return Some(e.to_string());
            }
        }
    }
    None
}

#[test]
fn every_malformed_file_gets_its_specific_error() {
    let mut failures = Vec::new();
    for (path, want) in corpus() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match folder_error(&path) {
            None => failures.push(format!("{name}: accepted")),
            Some(err) => {
                if !err.contains(&name) || !err.contains(&want) || err.contains('\n') {
                    failures.push(format!("{name}: want {want:?}, got {err}"));
                }
            }
        }
        // The whole-file reader rejects it too (its wording for header problems is the
        // safetensors crate's).
        match mapped_error(&path) {
            None => failures.push(format!("{name}: accepted by MappedFile")),
            Some(err) if !err.contains(&name) => failures.push(format!("{name}: {err}")),
            Some(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
