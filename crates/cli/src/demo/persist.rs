//! Writing the demo's outputs (4-bit base, PEFT adapter, merged model, summary) and reading them
//! back.
//!
//! Layout of the output directory:
//!
//! ```text
//! OUT/base/model.safetensors      embedding, lm_head, biases in bf16; fc1/fc2 NF4+DQ (bnb layout)
//! OUT/adapter/adapter_config.json PEFT config (r, lora_alpha, target_modules = fc1, fc2)
//! OUT/adapter/adapter_model.safetensors
//! OUT/merged/model.safetensors    every weight dense bf16: fc = bf16(deq(NF4) + s·B·A)
//! OUT/summary.json                what `--json` prints
//! ```
//!
//! Every file is written to a temporary name in its folder and renamed into place.

use super::model::{
    CharMlp, DenseLinear, Hidden, Vocab, EMBED, EMBED_NAME, FC1_IN, FC_NAMES, HEAD_NAME, HIDDEN,
};
use super::{BaseBf16, DemoError};
use half::bf16;
use qlora_checkpoint::{
    quantized_tensors, write_safetensors_atomic, Entry, MappedFile, OwnedTensor, TensorData,
};
use qlora_codec::QuantizedTensor;
use qlora_lora::peft::{write_atomic, AdapterConfig, PeftAdapter, TargetModules};
use qlora_lora::{
    merge_weight, AdapterWeights, BaseWeight, DenseData, Dtype, LoraLinear, LoraParams,
    MergeOptions, MergeOutput,
};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Metadata key holding the vocabulary (the characters in id order).
const META_VOCAB: &str = "qlora_demo.vocab";
/// Metadata key naming the architecture.
const META_ARCH: &str = "qlora_demo.architecture";

/// Where the outputs went.
#[derive(Debug, Clone)]
pub(crate) struct Saved {
    pub(crate) adapter_dir: PathBuf,
    pub(crate) base_path: PathBuf,
    pub(crate) merged_path: PathBuf,
}

/// Losses of the reloaded models.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reloaded {
    pub(crate) adapter_loss: f64,
    pub(crate) merged_loss: f64,
}

pub(crate) fn create_dir(dir: &Path) -> Result<(), DemoError> {
    std::fs::create_dir_all(dir).map_err(|source| DemoError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn metadata(vocab: &Vocab) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (META_VOCAB.to_string(), vocab.as_string()),
        (
            META_ARCH.to_string(),
            format!(
                "char-mlp context={} embed={EMBED} hidden={HIDDEN}",
                super::model::CONTEXT
            ),
        ),
    ])
}

fn bf16_tensor(name: String, v: &[bf16], shape: Vec<usize>) -> (String, OwnedTensor) {
    (name, TensorData::from_elements(v, shape))
}

/// The tensors every checkpoint of the demo shares: embedding, lm_head and the biases.
fn shared_tensors(base: &BaseBf16) -> Vec<(String, OwnedTensor)> {
    let v = base.head_b.len();
    let mut t = vec![
        bf16_tensor(format!("{EMBED_NAME}.weight"), &base.embed, vec![v, EMBED]),
        bf16_tensor(format!("{HEAD_NAME}.weight"), &base.head_w, vec![v, HIDDEN]),
        bf16_tensor(format!("{HEAD_NAME}.bias"), &base.head_b, vec![v]),
    ];
    for (name, b) in FC_NAMES.iter().zip(&base.fc_b) {
        t.push(bf16_tensor(format!("{name}.bias"), b, vec![HIDDEN]));
    }
    t
}

/// Write the 4-bit base, the PEFT adapter and the merged bf16 model under `out`.
pub(crate) fn save_all(
    out: &Path,
    vocab: &Vocab,
    base: &BaseBf16,
    quantized: &[QuantizedTensor; 2],
    adapters: &[AdapterWeights; 2],
    params: LoraParams,
) -> Result<Saved, DemoError> {
    let saved = Saved {
        adapter_dir: out.join("adapter"),
        base_path: out.join("base").join("model.safetensors"),
        merged_path: out.join("merged").join("model.safetensors"),
    };
    for dir in [out.join("base"), out.join("merged")] {
        create_dir(&dir)?;
    }

    let mut tensors = shared_tensors(base);
    for (name, q) in FC_NAMES.iter().zip(quantized) {
        tensors.extend(quantized_tensors(&format!("{name}.weight"), q));
    }
    write_safetensors_atomic(&saved.base_path, tensors, Some(metadata(vocab)))?;

    let mut config = AdapterConfig::new(
        params.r,
        params.alpha,
        TargetModules::List(vec!["fc1".into(), "fc2".into()]),
    );
    // The shortest decimal that round-trips the f32 (0.05, not 0.05000000074505806), as the
    // Python float a user would have written.
    config.lora_dropout = params
        .dropout
        .to_string()
        .parse()
        .unwrap_or(f64::from(params.dropout));
    config.task_type = Some("CAUSAL_LM".into());
    config.base_model_name_or_path = Some("../base".into());
    let modules: BTreeMap<String, AdapterWeights> = FC_NAMES
        .iter()
        .zip(adapters)
        .map(|(n, w)| (n.to_string(), w.clone()))
        .collect();
    let adapter = PeftAdapter {
        config,
        modules,
        other_tensors: BTreeMap::new(),
    };
    adapter.save(&saved.adapter_dir)?;

    // Merge into the weights the adapter was trained against (the dequantized NF4 base), in
    // f32, rounded once to bf16: PEFT's merge_and_unload on a dequantized model.
    let mut tensors = shared_tensors(base);
    for ((name, q), w) in FC_NAMES.iter().zip(quantized).zip(adapters) {
        let options = MergeOptions {
            safe: false,
            output: MergeOutput::Dense(Dtype::BF16),
        };
        let (merged, _) = merge_weight(&BaseWeight::quantized(q.clone())?, &params, w, options)?;
        let BaseWeight::Dense {
            data: DenseData::Bf16(values),
            ..
        } = merged
        else {
            return Err(DemoError::Invalid(format!(
                "{name}: merge did not return a dense bf16 weight"
            )));
        };
        tensors.push(bf16_tensor(
            format!("{name}.weight"),
            &values,
            q.shape().to_vec(),
        ));
    }
    write_safetensors_atomic(&saved.merged_path, tensors, Some(metadata(vocab)))?;
    Ok(saved)
}

/// Write `summary.json` atomically.
pub(crate) fn write_summary(out: &Path, summary: &serde_json::Value) -> Result<(), DemoError> {
    create_dir(out)?;
    let text = serde_json::to_string_pretty(summary)
        .map_err(|e| DemoError::Invalid(format!("summary: {e}")))?;
    write_atomic(&out.join("summary.json"), format!("{text}\n").as_bytes())?;
    Ok(())
}

fn check_len(path: &Path, name: &str, found: usize, expected: usize) -> Result<(), DemoError> {
    if found == expected {
        Ok(())
    } else {
        Err(DemoError::Invalid(format!(
            "{}: tensor {name} has {found} elements, expected {expected}",
            path.display()
        )))
    }
}

/// Load a demo checkpoint: 4-bit hidden layers become LoRA layers with `adapter`'s weights
/// (required for them), dense ones stay dense.
pub(crate) fn load_model(
    path: &Path,
    adapter: Option<&PeftAdapter>,
    vocab: &Vocab,
) -> Result<CharMlp, DemoError> {
    let file = MappedFile::open(path)?;
    let ck = file.checkpoint()?;
    let found_vocab = ck.metadata().and_then(|m| m.get(META_VOCAB));
    if found_vocab.map(String::as_str) != Some(vocab.as_string().as_str()) {
        return Err(DemoError::Invalid(format!(
            "{}: not a checkpoint of this demo's model (vocabulary missing or different)",
            path.display()
        )));
    }
    let v = vocab.len();
    let embed = ck.dense_as::<f32>(&format!("{EMBED_NAME}.weight"))?;
    check_len(path, EMBED_NAME, embed.len(), v * EMBED)?;
    let head_w = ck.dense_as::<f32>(&format!("{HEAD_NAME}.weight"))?;
    check_len(path, "lm_head.weight", head_w.len(), v * HIDDEN)?;
    let head_b = ck.dense_as::<f32>(&format!("{HEAD_NAME}.bias"))?;
    check_len(path, "lm_head.bias", head_b.len(), v)?;
    let dims = [(HIDDEN, FC1_IN), (HIDDEN, HIDDEN)];
    let mut fc = Vec::with_capacity(2);
    for (name, (out_f, in_f)) in FC_NAMES.iter().zip(dims) {
        let key = format!("{name}.weight");
        let bias = ck.dense_as::<f32>(&format!("{name}.bias"))?;
        check_len(path, &format!("{name}.bias"), bias.len(), out_f)?;
        let entry = ck.entries().iter().find(|e| e.name() == key);
        let base = match entry {
            Some(Entry::Quantized { .. }) => {
                let q = ck.quantized(&key)?;
                if q.shape() != [out_f, in_f] {
                    return Err(DemoError::Invalid(format!(
                        "{}: {key} has shape {:?}, expected [{out_f}, {in_f}]",
                        path.display(),
                        q.shape()
                    )));
                }
                BaseWeight::quantized(q)?
            }
            Some(Entry::Dense { .. }) => {
                let w = ck.dense_as::<f32>(&key)?;
                check_len(path, &key, w.len(), out_f * in_f)?;
                BaseWeight::dense(DenseData::F32(w), out_f, in_f)?
            }
            None => {
                return Err(DemoError::Invalid(format!(
                    "{}: no tensor {key}",
                    path.display()
                )))
            }
        };
        let layer = match (adapter, base) {
            (Some(a), base) => {
                let weights = a.modules.get(*name).ok_or_else(|| {
                    DemoError::Invalid(format!("the adapter has no weights for {name}"))
                })?;
                let params = a.config.params_for(name);
                Hidden::Lora(Box::new(LoraLinear::new(
                    base,
                    Some(bias),
                    params,
                    weights.clone(),
                )?))
            }
            (None, BaseWeight::Dense { data, .. }) => Hidden::Dense(DenseLinear {
                w: data.to_f32(),
                b: bias,
                out_f,
                in_f,
            }),
            (None, base @ BaseWeight::Quantized(_)) => Hidden::Dense(DenseLinear {
                w: base.to_f32()?,
                b: bias,
                out_f,
                in_f,
            }),
        };
        fc.push(layer);
    }
    let fc: [Hidden; 2] = fc
        .try_into()
        .map_err(|_| DemoError::Invalid("expected two hidden layers".into()))?;
    Ok(CharMlp {
        vocab_size: v,
        embed,
        fc,
        head: DenseLinear {
            w: head_w,
            b: head_b,
            out_f: v,
            in_f: HIDDEN,
        },
    })
}

/// Reload the adapter over the saved 4-bit base, and the merged model, and measure both on
/// `tokens`.
pub(crate) fn reload_and_check(
    saved: &Saved,
    vocab: &Vocab,
    tokens: &[u32],
) -> Result<Reloaded, DemoError> {
    let adapter = PeftAdapter::load(&saved.adapter_dir)?;
    let with_adapter = load_model(&saved.base_path, Some(&adapter), vocab)?;
    let merged = load_model(&saved.merged_path, None, vocab)?;
    Ok(Reloaded {
        adapter_loss: with_adapter.mean_loss(tokens)?,
        merged_loss: merged.mean_loss(tokens)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::model::{CharMlp, CONTEXT};
    use qlora_codec::QuantizeOptions;
    use qlora_lora::{init, Mode};

    fn setup() -> (
        Vocab,
        BaseBf16,
        [QuantizedTensor; 2],
        [AdapterWeights; 2],
        LoraParams,
    ) {
        let vocab = Vocab::from_texts(&["abcdefgh\n ."]);
        let base = BaseBf16::from_dense(&CharMlp::init(vocab.len(), 11)).unwrap();
        let q = |i: usize, in_f: usize| {
            QuantizedTensor::quantize(&base.fc_w[i], &[HIDDEN, in_f], QuantizeOptions::qlora())
                .unwrap()
        };
        let quantized = [q(0, FC1_IN), q(1, HIDDEN)];
        let params = LoraParams::new(4, 8.0);
        // init_random: B ≠ 0, so the adapter changes the output.
        let adapters = [
            init::init_random(4, FC1_IN, HIDDEN, 1),
            init::init_random(4, HIDDEN, HIDDEN, 2),
        ];
        (vocab, base, quantized, adapters, params)
    }

    #[test]
    fn saved_model_reloads_to_the_same_outputs() {
        let (vocab, base, quantized, adapters, params) = setup();
        let dir = tempfile::tempdir().unwrap();
        let saved = save_all(dir.path(), &vocab, &base, &quantized, &adapters, params).unwrap();
        let adapter = PeftAdapter::load(&saved.adapter_dir).unwrap();
        let reloaded = load_model(&saved.base_path, Some(&adapter), &vocab).unwrap();
        let merged = load_model(&saved.merged_path, None, &vocab).unwrap();

        let mut in_memory = crate::demo::qlora_model(&base, &quantized, params, 0).unwrap();
        for (h, w) in in_memory.fc.iter_mut().zip(&adapters) {
            let Hidden::Lora(l) = h else {
                panic!("LoRA layer expected")
            };
            *l.weights_mut() = w.clone();
        }
        let ctx: Vec<u32> = (0..4 * CONTEXT as u32)
            .map(|i| i % vocab.len() as u32)
            .collect();
        let want = in_memory.forward(&ctx, Mode::Eval).unwrap().logits;
        assert_eq!(reloaded.forward(&ctx, Mode::Eval).unwrap().logits, want);
        let got = merged.forward(&ctx, Mode::Eval).unwrap().logits;
        let max_err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(max_err < 0.05, "merged bf16 model is off by {max_err}");
        // The adapter really is part of the output.
        let base_only = crate::demo::qlora_model(&base, &quantized, params, 0).unwrap();
        assert_ne!(base_only.forward(&ctx, Mode::Eval).unwrap().logits, want);
    }

    #[test]
    fn foreign_or_damaged_checkpoints_are_errors() {
        let (vocab, base, quantized, adapters, params) = setup();
        let dir = tempfile::tempdir().unwrap();
        let saved = save_all(dir.path(), &vocab, &base, &quantized, &adapters, params).unwrap();

        let other = Vocab::from_texts(&["xyz"]);
        let e = load_model(&saved.merged_path, None, &other).unwrap_err();
        assert!(e.to_string().contains("vocabulary"), "{e}");

        // The 4-bit base without an adapter loads dequantized; with an adapter lacking a
        // module it is an error.
        assert!(load_model(&saved.base_path, None, &vocab).is_ok());
        let mut adapter = PeftAdapter::load(&saved.adapter_dir).unwrap();
        adapter.modules.remove(FC_NAMES[1]);
        let e = load_model(&saved.base_path, Some(&adapter), &vocab).unwrap_err();
        assert!(e.to_string().contains("fc2"), "{e}");

        let bytes = std::fs::read(&saved.base_path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(load_model(&cut, None, &vocab).is_err());
        assert!(load_model(&dir.path().join("missing.safetensors"), None, &vocab).is_err());
    }
}
