//! Outputs are atomic: the streamed writer gives safetensors' bytes, a failed conversion leaves
//! an existing output untouched and no temporary, leftovers of a killed run are removed by the
//! next conversion of the same output.

use qlora_checkpoint::atomic::temp_path;
use qlora_checkpoint::{
    convert_model, write_safetensors, write_safetensors_atomic, Conversion, ConvertOptions,
    QuantizeFileOptions, TensorData,
};
use std::collections::HashMap;
use std::path::Path;

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn tensors() -> Vec<(String, TensorData<'static>)> {
    let w: Vec<f32> = (0..64 * 64).map(|i| (i as f32 * 0.1).sin()).collect();
    vec![
        ("b.weight".into(), TensorData::from_f32(&w, vec![64, 64])),
        ("a.codes".into(), TensorData::from_u8(vec![3; 77], vec![77])),
        ("a.bias".into(), TensorData::from_f32(&w[..64], vec![64])),
    ]
}

#[test]
fn streamed_file_has_the_bytes_of_safetensors_serialize() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors_atomic(&out, tensors(), Some(meta.clone())).unwrap();
    let expected = safetensors::serialize(tensors(), Some(meta)).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), expected);
    write_safetensors_atomic(&out, tensors(), None).unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        write_safetensors(tensors()).unwrap()
    );
    assert_eq!(listing(dir.path()), ["m.safetensors"]);
}

fn quantize() -> Conversion {
    Conversion::Quantize {
        options: QuantizeFileOptions::default(),
        compute_dtype: None,
    }
}

#[test]
fn failed_conversion_keeps_the_existing_output_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    // A NaN deep in the second tensor: the conversion fails after writing has begun.
    let mut w: Vec<f32> = (0..256 * 256).map(|i| (i as f32 * 0.01).cos()).collect();
    let good = TensorData::from_f32(&w, vec![256, 256]);
    w[256 * 200] = f32::NAN;
    let bad = TensorData::from_f32(&w, vec![256, 256]);
    write_safetensors_atomic(
        &input,
        vec![("a.weight".into(), good), ("z.weight".into(), bad)],
        None,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    std::fs::write(&out, b"previous output").unwrap();
    let err = convert_model(&input, &out, &quantize(), &ConvertOptions::default()).unwrap_err();
    assert!(err.to_string().contains("z.weight"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous output");
    assert_eq!(listing(dir.path()), ["in.safetensors", "out.safetensors"]);
}

#[test]
fn leftovers_of_a_killed_conversion_are_removed_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let w: Vec<f32> = (0..128 * 128).map(|i| (i as f32 * 0.01).cos()).collect();
    write_safetensors_atomic(
        &input,
        vec![("l.weight".into(), TensorData::from_f32(&w, vec![128, 128]))],
        None,
    )
    .unwrap();
    let out = dir.path().join("out");
    // A folder output and a file output of runs that no longer exist (pid u32::MAX never does).
    std::fs::create_dir(temp_path(&out, u32::MAX)).unwrap();
    std::fs::write(temp_path(&out, u32::MAX).join("model.safetensors"), b"half").unwrap();
    convert_model(&input, &out, &quantize(), &ConvertOptions::default()).unwrap();
    assert_eq!(listing(dir.path()), ["in.safetensors", "out"]);
}
