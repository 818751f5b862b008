//! Agreement with PEFT 0.21.2 (+ bitsandbytes 0.50.2, CPU) on the vectors under testdata/peft/
//! (tools/gen_peft_vectors.py).

use half::bf16;
use qlora_codec::{Absmax, DoubleQuantAbsmax, Dtype, QuantType, QuantizedTensor};
use qlora_lora::peft::PeftAdapter;
use qlora_lora::{
    merge_weight, AdapterWeights, BaseWeight, DenseData, LoraLinear, LoraParams, MergeOptions, Mode,
};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

struct File {
    bytes: Vec<u8>,
}

impl File {
    fn open(p: &Path) -> Self {
        File {
            bytes: std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn metadata(&self) -> BTreeMap<String, String> {
        let (_, m) = SafeTensors::read_metadata(&self.bytes).unwrap();
        m.metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect()
    }
    fn f32(&self, k: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(k).unwrap_or_else(|_| panic!("missing {k}"));
        match t.dtype() {
            safetensors::Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            d => panic!("{k}: {d:?}"),
        }
    }
    fn bf16(&self, k: &str) -> Vec<bf16> {
        let st = self.st();
        let t = st.tensor(k).unwrap_or_else(|_| panic!("missing {k}"));
        assert_eq!(t.dtype(), safetensors::Dtype::BF16, "{k}");
        t.data()
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]))
            .collect()
    }
    fn u8(&self, k: &str) -> Vec<u8> {
        self.st()
            .tensor(k)
            .unwrap_or_else(|_| panic!("missing {k}"))
            .data()
            .to_vec()
    }
}

/// Relative max-abs error.
fn rel_err(ours: &[f32], want: &[f32]) -> f32 {
    assert_eq!(ours.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    ours.iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

fn q4_from(f: &File, prefix: &str, meta: &serde_json::Value) -> QuantizedTensor {
    let shape: Vec<usize> = meta["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let dtype = Dtype::from_torch_name(meta["dtype"].as_str().unwrap()).unwrap();
    let absmax = if meta["nested"].as_bool().unwrap() {
        Absmax::Double(DoubleQuantAbsmax {
            codes: f.u8(&format!("{prefix}.absmax_codes")),
            nested_absmax: f.f32(&format!("{prefix}.nested_absmax")),
            offset: f.f32(&format!("{prefix}.offset"))[0],
        })
    } else {
        Absmax::F32(f.f32(&format!("{prefix}.absmax")))
    };
    QuantizedTensor::from_parts(
        QuantType::parse(meta["quant_type"].as_str().unwrap()).unwrap(),
        meta["blocksize"].as_u64().unwrap() as usize,
        dtype,
        shape,
        f.u8(&format!("{prefix}.packed")),
        absmax,
    )
    .unwrap()
}

fn layer_case(name: &str, base: impl Fn(&File) -> BaseWeight) {
    let f = File::open(&root().join(format!("peft/layer-{name}.safetensors")));
    let meta = f.metadata();
    let r: usize = meta["r"].parse().unwrap();
    let alpha: f64 = meta["lora_alpha"].parse().unwrap();
    let params = LoraParams {
        r,
        alpha,
        use_rslora: meta["use_rslora"] == "True",
        dropout: 0.0,
        use_dora: meta["use_dora"] == "True",
    };
    assert_eq!(
        params.scaling(),
        meta["scaling"].parse::<f64>().unwrap(),
        "{name}: scaling"
    );
    let weights = AdapterWeights {
        a: f.f32("A"),
        b: f.f32("B"),
        magnitude: params.use_dora.then(|| f.f32("m")),
    };
    let layer = LoraLinear::new(base(&f), Some(f.f32("bias")), params, weights).unwrap();
    let x = f.f32("x");
    let n = x.len() / 64;
    let (y, cache) = layer.forward(&x, n, Mode::Eval).unwrap();
    let g = layer.backward(&x, &cache, &f.f32("gy")).unwrap();
    let errs = [
        ("y", rel_err(&y, &f.f32("y"))),
        ("dx", rel_err(&g.x, &f.f32("dx"))),
        ("dA", rel_err(&g.a, &f.f32("dA"))),
        ("dB", rel_err(&g.b, &f.f32("dB"))),
        (
            "dm",
            g.magnitude
                .as_ref()
                .map_or(0.0, |m| rel_err(m, &f.f32("dm"))),
        ),
    ];
    eprintln!("layer-{name}: {errs:?}");
    for (what, e) in errs {
        assert!(e < 2e-6, "layer-{name}: {what} relative error {e}");
    }
}

fn dense_w(f: &File) -> BaseWeight {
    BaseWeight::dense(DenseData::F32(f.f32("W")), 48, 64).unwrap()
}

#[test]
fn forward_and_gradients_match_peft_lora() {
    layer_case("lora", dense_w);
}

#[test]
fn forward_and_gradients_match_peft_rslora() {
    layer_case("rslora", dense_w);
}

#[test]
fn forward_and_gradients_match_peft_dora() {
    layer_case("dora", dense_w);
}

#[test]
fn forward_and_gradients_match_peft_over_bnb_nf4() {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root().join("peft/layer-nf4.json")).unwrap())
            .unwrap();
    layer_case("nf4", |f| {
        BaseWeight::quantized(q4_from(f, "W4", &meta)).unwrap()
    });
}

/// The bf16 tiny Llama's tensors by name.
fn bf16_base() -> BTreeMap<String, (Vec<usize>, Vec<bf16>)> {
    let dir = root().join("checkpoints/tiny-llama-bf16");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let f = File::open(&p);
            let st = f.st();
            for k in st.names() {
                let t = st.tensor(k).unwrap();
                if t.dtype() == safetensors::Dtype::BF16 {
                    out.insert(k.to_string(), (t.shape().to_vec(), f.bf16(k)));
                }
            }
        }
    }
    out
}

fn adapter(name: &str) -> PeftAdapter {
    PeftAdapter::load(&root().join(format!("peft/adapters/{name}"))).unwrap()
}

fn bf16_merge_case(name: &str) {
    let base = bf16_base();
    let ad = adapter(name);
    let want = File::open(&root().join(format!("peft/merged-bf16-{name}.safetensors")));
    let (mut total, mut exact, mut max_ulp) = (0usize, 0usize, 0i32);
    for (module, w) in &ad.modules {
        let (shape, data) = &base[&format!("{module}.weight")];
        let bw = BaseWeight::dense(DenseData::Bf16(data.clone()), shape[0], shape[1]).unwrap();
        let (merged, _) = merge_weight(
            &bw,
            &ad.config.params_for(module),
            w,
            MergeOptions::default(),
        )
        .unwrap();
        let BaseWeight::Dense {
            data: DenseData::Bf16(ours),
            ..
        } = merged
        else {
            panic!("not bf16")
        };
        let theirs = want.bf16(&format!("{module}.weight"));
        for (a, b) in ours.iter().zip(&theirs) {
            total += 1;
            let d = (a.to_bits() as i16 as i32 - b.to_bits() as i16 as i32).abs();
            exact += (d == 0) as usize;
            max_ulp = max_ulp.max(d);
        }
    }
    let frac = exact as f64 / total as f64;
    eprintln!(
        "merged-bf16-{name}: {exact}/{total} exact ({:.4} %), max {max_ulp} ulp",
        100.0 * frac
    );
    assert!(max_ulp <= 1, "{name}: max ulp {max_ulp}");
    assert!(frac >= 0.99, "{name}: only {frac} exact");
}

#[test]
fn bf16_merge_matches_peft_lora() {
    bf16_merge_case("lora");
}

#[test]
fn bf16_merge_matches_peft_rslora() {
    bf16_merge_case("rslora");
}

#[test]
fn bf16_merge_matches_peft_dora() {
    bf16_merge_case("dora");
}

fn nibbles(p: &[u8]) -> impl Iterator<Item = u8> + '_ {
    p.iter().flat_map(|b| [b >> 4, b & 15])
}

fn nf4_merge_case(name: &str) {
    let basef = File::open(&root().join("peft/base-nf4.safetensors"));
    let base_meta: serde_json::Value = serde_json::from_str(&basef.metadata()["modules"]).unwrap();
    let want = File::open(&root().join(format!("peft/merged-nf4-{name}.safetensors")));
    let want_meta: serde_json::Value = serde_json::from_str(&want.metadata()["modules"]).unwrap();
    let ad = adapter(name);
    let (mut total, mut same, mut within) = (0usize, 0usize, 0usize);
    let mut worst_step = 0.0f32;
    for (module, w) in &ad.modules {
        let q = q4_from(&basef, module, &base_meta[module]);
        let bw = BaseWeight::quantized(q).unwrap();
        let (merged, report) = merge_weight(
            &bw,
            &ad.config.params_for(module),
            w,
            MergeOptions::default(),
        )
        .unwrap();
        assert!(report.requantization.is_some());
        let BaseWeight::Quantized(ours) = &merged else {
            panic!("not 4-bit")
        };
        let theirs = q4_from(&want, module, &want_meta[module]);
        assert_eq!(ours.dtype(), theirs.dtype(), "{module}: dtype");
        assert_eq!(ours.is_double_quant(), theirs.is_double_quant());
        let n = ours.numel();
        let (dq_o, dq_t) = (
            ours.dequantize::<f32>().unwrap(),
            theirs.dequantize::<f32>().unwrap(),
        );
        let am = theirs.absmax().to_f32();
        for (i, (a, b)) in nibbles(ours.packed())
            .zip(nibbles(theirs.packed()))
            .take(n)
            .enumerate()
        {
            total += 1;
            same += (a == b) as usize;
            // one code step: the widest gap between adjacent NF4 values times the block absmax
            let step = 0.3039 * am[i / theirs.blocksize()] * 1.01;
            let d = (dq_o[i] - dq_t[i]).abs();
            within += (d <= step) as usize;
            worst_step = worst_step.max(d / (am[i / theirs.blocksize()] * 0.3039));
        }
    }
    let frac = same as f64 / total as f64;
    eprintln!(
        "merged-nf4-{name}: codes {same}/{total} equal ({:.3} %), {within}/{total} within one code step (worst {worst_step:.3} steps)",
        100.0 * frac
    );
    assert!(frac >= 0.99, "{name}: {frac}");
    assert_eq!(
        within, total,
        "{name}: some values differ by more than one code step"
    );
}

#[test]
fn nf4_merge_matches_peft_lora() {
    nf4_merge_case("lora");
}

#[test]
fn nf4_merge_matches_peft_rslora() {
    nf4_merge_case("rslora");
}

#[test]
fn nf4_merge_matches_peft_dora() {
    nf4_merge_case("dora");
}

#[test]
fn peft_adapters_load_with_the_right_structure() {
    let lora = adapter("lora");
    assert_eq!(lora.modules.len(), 14);
    assert!(lora.config.targets("model.layers.1.mlp.down_proj"));
    assert!(!lora.config.targets("lm_head"));
    let rs = adapter("rslora");
    assert_eq!(rs.modules.len(), 6);
    assert_eq!(rs.config.params_for("model.layers.0.mlp.down_proj").r, 2);
    assert_eq!(
        rs.config
            .params_for("model.layers.1.self_attn.q_proj")
            .alpha,
        32.0
    );
    assert_eq!(
        rs.config
            .params_for("model.layers.0.self_attn.q_proj")
            .alpha,
        8.0
    );
    assert!(rs.config.targets("model.layers.0.self_attn.v_proj"));
    assert!(!rs.config.targets("model.layers.0.self_attn.k_proj"));
    let dora = adapter("dora");
    assert!(dora.modules.values().all(|w| w.magnitude.is_some()));
}

#[test]
fn saved_adapters_are_byte_identical_to_peft() {
    for name in ["lora", "rslora", "dora"] {
        let ad = adapter(name);
        let dir = tempfile::tempdir().unwrap();
        ad.save(dir.path()).unwrap();
        let src = root().join(format!("peft/adapters/{name}"));
        let ours = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
        let theirs = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
        assert!(
            ours == theirs,
            "{name}: adapter_model.safetensors bytes differ"
        );
        let cfg_o: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap())
                .unwrap();
        let cfg_t: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg_o, cfg_t, "{name}: config differs");
        let reread = PeftAdapter::load(dir.path()).unwrap();
        assert_eq!(reread, ad);
    }
}

#[test]
fn whole_adapter_merge_checks_the_base() {
    let base = bf16_base();
    let ad = adapter("rslora");
    let lookup = |m: &str| -> qlora_lora::Result<Option<BaseWeight>> {
        Ok(base
            .get(&format!("{m}.weight"))
            .map(|(s, d)| BaseWeight::dense(DenseData::Bf16(d.clone()), s[0], s[1]).unwrap()))
    };
    let merged = qlora_lora::merge_adapter(&ad, lookup, MergeOptions::default()).unwrap();
    assert_eq!(merged.len(), 6);
    assert!(merged.iter().all(|m| m.report.delta_norm > 0.0));
    // a missing module and a shape mismatch are named
    let err = qlora_lora::merge_adapter(&ad, |_| Ok(None), MergeOptions::default()).unwrap_err();
    assert!(
        matches!(&err, qlora_lora::Error::Module { module, .. } if module.contains("layers.0")),
        "{err}"
    );
    let wrong = |_: &str| -> qlora_lora::Result<Option<BaseWeight>> {
        Ok(Some(
            BaseWeight::dense(DenseData::F32(vec![0.0; 12]), 3, 4).unwrap(),
        ))
    };
    let err = qlora_lora::merge_adapter(&ad, wrong, MergeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
}
