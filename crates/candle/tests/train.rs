//! `qlora_candle::train`: pretraining a small Llama lowers the loss; gradient accumulation equals
//! one big batch.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, SGD};
use qlora_candle::data::{BpeTokenizer, TokenDataset};
use qlora_candle::llama::{varmap_tensors, LlamaConfig, LlamaForCausalLM};
use qlora_candle::train::Trainer;

fn corpus() -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/llama/tokenizer/corpus.txt"),
    )
    .unwrap()
}

#[test]
fn pretraining_lowers_the_loss() {
    let text = corpus();
    let tok = BpeTokenizer::train(&[text.as_str()], 400, &["<|endoftext|>"]).unwrap();
    let data = TokenDataset::from_text(&tok, &text, 32).unwrap();
    let cfg = LlamaConfig::tiny(tok.vocab_size(), 64, 2, 4, 2);
    let (model, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
    let params = ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.0,
        ..Default::default()
    };
    let opt = AdamW::new(varmap.all_vars(), params).unwrap();
    let mut trainer = Trainer::new(opt, varmap.all_vars());
    let eval = data.batches(16, 99, 0, &Device::Cpu).unwrap();
    let before = trainer.eval(&model, &eval).unwrap();
    let mut losses = Vec::new();
    for epoch in 0..2 {
        for batch in data.batches(16, 5, epoch, &Device::Cpu).unwrap() {
            losses.push(trainer.step(&model, &[batch]).unwrap().loss);
        }
    }
    let after = trainer.eval(&model, &eval).unwrap();
    eprintln!(
        "{} parameters, {} steps: loss {before:.3} -> {after:.3} (first step {:.3}, last {:.3})",
        cfg.num_parameters(),
        trainer.steps(),
        losses[0],
        losses[losses.len() - 1]
    );
    assert!((before - (400f32).ln()).abs() < 0.2, "{before}");
    assert!(after < before - 1.0, "{before} -> {after}");
}

#[test]
fn accumulated_micro_batches_equal_one_batch() {
    let dev = Device::Cpu;
    let cfg = LlamaConfig::tiny(40, 16, 1, 2, 1);
    let ids = Tensor::new(
        &[
            [1u32, 7, 3, 9, 4, 2],
            [5, 5, 0, 8, 6, 1],
            [3, 3, 9, 8, 7, 6],
        ],
        &dev,
    )
    .unwrap();
    // Different numbers of labelled tokens per row, so the weighting matters.
    let labels = Tensor::new(
        &[
            [-100i64, 7, 3, 9, 4, 2],
            [5, 5, 0, -100, -100, -100],
            [-100, -100, -100, -100, 7, 6],
        ],
        &dev,
    )
    .unwrap();
    let run = |split: bool| {
        let (model, varmap) = LlamaForCausalLM::init_random(&cfg, DType::F64, &dev, 9).unwrap();
        let opt = SGD::new(varmap.all_vars(), 0.5).unwrap();
        let mut trainer = Trainer::new(opt, varmap.all_vars());
        let batch = |r: std::ops::Range<usize>| qlora_candle::data::Batch {
            input_ids: ids.narrow(0, r.start, r.len()).unwrap(),
            labels: labels.narrow(0, r.start, r.len()).unwrap(),
        };
        let stats = if split {
            trainer.step(&model, &[batch(0..1), batch(1..3)]).unwrap()
        } else {
            trainer.step(&model, &[batch(0..3)]).unwrap()
        };
        (stats, varmap_tensors(&varmap))
    };
    let (one, w_one) = run(false);
    let (acc, w_acc) = run(true);
    assert_eq!(one.labelled_tokens, 9);
    assert_eq!(acc.labelled_tokens, 9);
    assert!(
        (one.loss - acc.loss).abs() < 1e-6,
        "{} vs {}",
        one.loss,
        acc.loss
    );
    for (name, t) in &w_one {
        let d = (t - &w_acc[name])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{name}: {d}");
    }
    // And the step moved the weights.
    let (_, fresh) = {
        let (m, v) = LlamaForCausalLM::init_random(&cfg, DType::F64, &dev, 9).unwrap();
        (m, varmap_tensors(&v))
    };
    let w = "model.layers.0.mlp.down_proj.weight";
    let moved = (&fresh[w] - &w_one[w])
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(moved > 0.0);
}
