//! Parameter gradients of `qlora_candle::llama` (candle autograd) against central finite
//! differences of the loss, in f64, on tiny configs (GQA untied; Qwen2 layout with biases and
//! tied embeddings).

use candle_core::{DType, Device, Tensor, Var};
use qlora_candle::llama::{LlamaConfig, LlamaForCausalLM};

fn loss_of(model: &LlamaForCausalLM, ids: &Tensor, labels: &Tensor) -> f64 {
    model.loss(ids, labels).unwrap().to_scalar::<f64>().unwrap()
}

fn set_values(var: &Var, values: Vec<f64>) {
    let t = Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap();
    var.set(&t).unwrap();
}

fn check(cfg: &LlamaConfig, seed: u64) {
    let dev = Device::Cpu;
    let (model, varmap) = LlamaForCausalLM::init_random(cfg, DType::F64, &dev, seed).unwrap();
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    // transformers initialises norms to 1 and biases to 0; move them so their gradients matter.
    for (i, (name, var)) in vars.iter().enumerate() {
        let n = var.elem_count();
        let wave = |j: usize| ((i * 31 + j * 7) as f64 * 0.37).sin();
        if name.ends_with("norm.weight") {
            set_values(var, (0..n).map(|j| 1.0 + 0.3 * wave(j)).collect());
        } else if name.ends_with(".bias") {
            set_values(var, (0..n).map(|j| 0.2 * wave(j)).collect());
        }
    }
    let ids = Tensor::new(&[[1u32, 7, 3, 9, 4, 2], [5, 5, 0, 8, 6, 1]], &dev).unwrap();
    let labels = Tensor::new(&[[-100i64, 7, 3, 9, 4, 2], [5, 5, 0, 8, -100, -100]], &dev).unwrap();
    let grads = model.loss(&ids, &labels).unwrap().backward().unwrap();
    let h = 1e-5;
    let mut checked = 0;
    let mut worst = 0f64;
    for (name, var) in &vars {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
        let n = w.len();
        for k in 0..3 {
            let idx = (k * 7919 + name.len() * 13) % n;
            let mut plus = w.clone();
            plus[idx] += h;
            set_values(var, plus);
            let lp = loss_of(&model, &ids, &labels);
            let mut minus = w.clone();
            minus[idx] -= h;
            set_values(var, minus);
            let lm = loss_of(&model, &ids, &labels);
            set_values(var, w.clone());
            let fd = (lp - lm) / (2.0 * h);
            let err = (fd - g[idx]).abs();
            worst = worst.max(err / g[idx].abs().max(1e-8));
            assert!(
                err <= 1e-8 + 1e-5 * g[idx].abs(),
                "{name}[{idx}]: autograd {} vs finite difference {fd} (err {err:e})",
                g[idx]
            );
            checked += 1;
        }
        let gmax = g.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(gmax > 1e-6, "{name}: gradient is zero everywhere");
    }
    assert_eq!(checked, 3 * cfg.parameter_shapes().len());
    eprintln!(
        "{}: {checked} gradient entries, worst relative error {worst:.2e}",
        cfg.model_type
    );
}

#[test]
fn gradients_match_finite_differences_gqa() {
    let mut cfg = LlamaConfig::tiny(24, 16, 2, 4, 2);
    cfg.initializer_range = Some(0.3);
    check(&cfg, 5);
}

#[test]
fn gradients_match_finite_differences_qwen2_tied() {
    let mut cfg = LlamaConfig::tiny(20, 16, 1, 2, 1);
    cfg.model_type = "qwen2".to_string();
    cfg.architectures = vec!["Qwen2ForCausalLM".to_string()];
    cfg.tie_word_embeddings = true;
    cfg.initializer_range = Some(0.3);
    check(&cfg, 6);
}
