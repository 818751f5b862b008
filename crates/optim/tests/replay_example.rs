//! The `adamw_replay` example: output equals the library's replay, keys equal bitsandbytes'
//! recorded OUT files, and bad input exits non-zero without leaving an output file.

use qlora_optim::{Adam, AdamConfig, ParamUpdate, TensorMut, TensorRef};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;

fn example() -> PathBuf {
    // tests run from target/<profile>/deps; cargo test builds examples next to it.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(format!("adamw_replay{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "{} not built", path.display());
    path
}

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/optim")
        .join(name)
}

fn flags(optim: &str, lr: &str, b1: &str, b2: &str, eps: &str, wd: &str) -> Vec<String> {
    [
        "--optim",
        optim,
        "--lr",
        lr,
        "--beta1",
        b1,
        "--beta2",
        b2,
        "--eps",
        eps,
        "--weight-decay",
        wd,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(input: &Path, output: &Path, flags: &[String]) -> std::process::Output {
    Command::new(example())
        .arg(input)
        .arg(output)
        .args(flags)
        .output()
        .unwrap()
}

#[test]
fn writes_the_bitsandbytes_layout() {
    let dir = tempfile::tempdir().unwrap();
    for (case, f) in [
        (
            "adamw8bit_n4500",
            flags("adamw8bit", "1e-3", "0.9", "0.999", "1e-8", "1e-2"),
        ),
        (
            "adam8bit_n1000",
            flags("adam8bit", "2e-3", "0.9", "0.995", "1e-6", "0"),
        ),
        (
            "adamw32bit_n4500",
            flags("adamw32bit", "1e-3", "0.9", "0.999", "1e-8", "0.1"),
        ),
    ] {
        let out = dir.path().join(format!("{case}.out.safetensors"));
        let r = run(&testdata(&format!("{case}.in.safetensors")), &out, &f);
        assert!(
            r.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let ours = std::fs::read(&out).unwrap();
        let theirs = std::fs::read(testdata(&format!("{case}.out.safetensors"))).unwrap();
        let ours = SafeTensors::deserialize(&ours).unwrap();
        let theirs = SafeTensors::deserialize(&theirs).unwrap();
        let mut a: Vec<&str> = ours.names();
        let mut b: Vec<&str> = theirs.names();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case}: key sets");
        for name in a {
            let (x, y) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
            assert_eq!(x.dtype(), y.dtype(), "{case}/{name}");
            assert_eq!(x.shape(), y.shape(), "{case}/{name}");
        }
        if case == "adamw8bit_n4500" {
            // Bit-identical to the library run in-process.
            let inp = std::fs::read(testdata(&format!("{case}.in.safetensors"))).unwrap();
            let inp = SafeTensors::deserialize(&inp).unwrap();
            let f32s = |st: &SafeTensors<'_>, k: &str| -> Vec<f32> {
                st.tensor(k)
                    .unwrap()
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            };
            let mut p = f32s(&inp, "p0");
            let mut opt = Adam::new(AdamConfig::adamw8bit()).unwrap();
            let id = opt.add_param(0, p.len()).unwrap();
            for k in 0..12 {
                let g = f32s(&inp, &format!("grad{k}"));
                opt.step(&mut [ParamUpdate {
                    id,
                    param: TensorMut::F32(&mut p),
                    grad: TensorRef::F32(&g),
                }])
                .unwrap();
                let q = f32s(&ours, &format!("param{k}"));
                assert!(p.iter().zip(&q).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
            let state = opt.state(id).unwrap().unwrap().to_tensors("").unwrap();
            for (name, t) in state {
                assert_eq!(ours.tensor(&name).unwrap().data(), &t.data[..], "{name}");
            }
        }
        // The step counter and the maps are identical; the rest is compared in bnb_vectors.rs.
        for name in ["step", "qmap1", "qmap2"] {
            if let (Ok(x), Ok(y)) = (ours.tensor(name), theirs.tensor(name)) {
                assert_eq!(x.data(), y.data(), "{case}/{name}");
            }
        }
    }
}

#[test]
fn bad_input_fails_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let good = flags("adamw8bit", "1e-3", "0.9", "0.999", "1e-8", "1e-2");
    let input = testdata("adamw8bit_n4500.in.safetensors");
    // A grad of the wrong length.
    let bad_in = dir.path().join("bad.safetensors");
    {
        let bytes = std::fs::read(&input).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, qlora_optim::TensorData)> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    qlora_optim::TensorData {
                        dtype: v.dtype(),
                        shape: v.shape().to_vec(),
                        data: v.data().to_vec(),
                    },
                )
            })
            .collect();
        let g5 = tensors.iter_mut().find(|(k, _)| k == "grad5").unwrap();
        g5.1.shape = vec![4496];
        g5.1.data.truncate(4496 * 4);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
        std::fs::write(&bad_in, bytes).unwrap();
    }
    let mut cases: Vec<(PathBuf, Vec<String>, &str)> = vec![
        (
            dir.path().join("missing.safetensors"),
            good.clone(),
            "i/o error",
        ),
        (bad_in, good.clone(), "grad5"),
        (
            input.clone(),
            flags("adagrad", "1e-3", "0.9", "0.999", "1e-8", "0"),
            "unknown optimizer",
        ),
        (
            input.clone(),
            flags("adamw8bit", "abc", "0.9", "0.999", "1e-8", "0"),
            "not a number",
        ),
        (
            input.clone(),
            flags("adamw8bit", "1e-3", "1.5", "0.999", "1e-8", "0"),
            "beta1",
        ),
    ];
    let mut extra = good.clone();
    extra.push("--momentum".into());
    extra.push("1".into());
    cases.push((input.clone(), extra, "unknown flag"));
    cases.push((
        input.clone(),
        good[..good.len() - 1].to_vec(),
        "needs a value",
    ));
    for (inp, f, msg) in cases {
        let r = run(&inp, &out, &f);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{msg}: succeeded");
        assert!(err.contains(msg), "expected `{msg}` in: {err}");
        assert!(!out.exists(), "{msg}: output left behind");
        // No temporary files either.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(left.is_empty(), "{msg}: {left:?}");
    }
}
