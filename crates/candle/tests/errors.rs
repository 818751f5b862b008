//! Bad input gets a clear error, never a panic: shapes, dtypes, adapters that do not fit the
//! base, corrupt adapter files; and the errors travel through candle's `Result`.

use candle_core::{DType, Device, Module, Tensor};
use qlora_candle::{Error, Linear4bit, LoraInit, LoraLinear};
use qlora_codec::{QuantizeOptions, QuantizedTensor};
use qlora_lora::peft::{AdapterConfig, PeftAdapter, TargetModules};
use qlora_lora::{AdapterWeights, LoraParams};

fn layer(out_f: usize, in_f: usize) -> Linear4bit {
    let w: Vec<f32> = (0..out_f * in_f)
        .map(|i| (i as f32 * 0.37).sin() * 0.1)
        .collect();
    let q = QuantizedTensor::quantize(&w, &[out_f, in_f], QuantizeOptions::qlora()).unwrap();
    Linear4bit::new(q, None).unwrap()
}

fn zeros(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(shape, dtype, &Device::Cpu).unwrap()
}

#[test]
fn linear4bit_refuses_bad_inputs() {
    let l = layer(32, 64);
    // Wrong last dimension: the message names the expected and found shapes.
    let e = l
        .forward(&zeros(&[3, 65], DType::F32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[3, 64]") && e.contains("[3, 65]"), "{e}");
    // A scalar input.
    assert!(l
        .forward(&Tensor::new(1f32, &Device::Cpu).unwrap())
        .is_err());
    // Integer and f64 inputs.
    for dtype in [DType::U32, DType::F64] {
        let e = l.forward(&zeros(&[2, 64], dtype)).unwrap_err().to_string();
        assert!(e.contains("expected dtype f32, bf16 or f16"), "{e}");
    }
    // Weights that are not 2-D, biases of the wrong length, 3-D dense weights.
    let q1 = QuantizedTensor::quantize(&[0.5f32; 128], &[128], QuantizeOptions::qlora()).unwrap();
    assert!(matches!(
        Linear4bit::new(q1, None),
        Err(Error::Shape { .. })
    ));
    let q = layer(32, 64).weight().clone();
    let bias = Some(zeros(&[31], DType::F32));
    assert!(matches!(
        Linear4bit::new(q.clone(), bias),
        Err(Error::Shape { .. })
    ));
    let bias = Some(zeros(&[32], DType::U8));
    assert!(matches!(Linear4bit::new(q, bias), Err(Error::Dtype { .. })));
    let w3 = zeros(&[2, 32, 64], DType::F32);
    assert!(matches!(
        Linear4bit::from_tensor(&w3, None, QuantizeOptions::qlora()),
        Err(Error::Shape { .. })
    ));
    // A block size the codec refuses.
    let w = zeros(&[32, 64], DType::F32);
    let bad = QuantizeOptions::qlora().with_blocksize(100);
    assert!(matches!(
        Linear4bit::from_tensor(&w, None, bad),
        Err(Error::Codec(_))
    ));
}

#[test]
fn lora_refuses_adapters_that_do_not_fit() {
    let base = layer(32, 64);
    let params = LoraParams::new(4, 8.0);
    let wrong = AdapterWeights {
        a: vec![0.0; 4 * 63],
        b: vec![0.0; 32 * 4],
        magnitude: None,
    };
    let e = LoraLinear::new(base.clone(), params, LoraInit::Weights(wrong)).unwrap_err();
    assert!(matches!(e, Error::Adapter { .. }), "{e}");
    assert!(e.to_string().contains("lora_A.weight"), "{e}");
    let nan = AdapterWeights {
        a: vec![f32::NAN; 4 * 64],
        b: vec![0.0; 32 * 4],
        magnitude: None,
    };
    assert!(LoraLinear::new(base.clone(), params, LoraInit::Weights(nan)).is_err());
    let stray_magnitude = AdapterWeights {
        a: vec![0.0; 4 * 64],
        b: vec![0.0; 32 * 4],
        magnitude: Some(vec![1.0; 32]),
    };
    assert!(LoraLinear::new(base.clone(), params, LoraInit::Weights(stray_magnitude)).is_err());
    // Rank 0, dropout 1.
    assert!(LoraLinear::new(
        base.clone(),
        LoraParams::new(0, 8.0),
        LoraInit::Default { seed: 0 }
    )
    .is_err());
    let p1 = LoraParams {
        dropout: 1.0,
        ..params
    };
    assert!(LoraLinear::new(base.clone(), p1, LoraInit::Default { seed: 0 }).is_err());
    // LoftQ needs the full-precision weight.
    let e = LoraLinear::new(base.clone(), params, LoraInit::Loftq(Default::default())).unwrap_err();
    assert!(e.to_string().contains("LoftQ"), "{e}");
    // A PEFT adapter: a module it lacks, and a module whose factors do not fit this base.
    let mut adapter = PeftAdapter {
        config: AdapterConfig::new(4, 8.0, TargetModules::List(vec!["q_proj".into()])),
        modules: Default::default(),
        other_tensors: Default::default(),
    };
    adapter.modules.insert(
        "model.layers.0.self_attn.q_proj".into(),
        AdapterWeights {
            a: vec![0.0; 4 * 128],
            b: vec![0.0; 32 * 4],
            magnitude: None,
        },
    );
    let e = LoraLinear::from_peft(base.clone(), &adapter, "model.layers.0.self_attn.k_proj")
        .unwrap_err();
    assert!(e.to_string().contains("k_proj") && e.to_string().contains("not in the adapter"));
    let e = LoraLinear::from_peft(base.clone(), &adapter, "model.layers.0.self_attn.q_proj")
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("q_proj") && msg.contains("lora_A.weight"),
        "{msg}"
    );
    // Input of the wrong width through the LoRA layer, and through candle's Result.
    let l = LoraLinear::new(base, params, LoraInit::Default { seed: 0 }).unwrap();
    let e: candle_core::Error = l.forward(&zeros(&[2, 10], DType::F32)).unwrap_err();
    assert!(e.to_string().contains("in_features"), "{e}");
}

#[test]
fn corrupt_adapter_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = PeftAdapter {
        config: AdapterConfig::new(4, 8.0, TargetModules::List(vec!["q_proj".into()])),
        modules: Default::default(),
        other_tensors: Default::default(),
    };
    adapter.save(dir.path()).unwrap();
    std::fs::write(
        dir.path().join("adapter_model.safetensors"),
        b"\xff\xff\xff\xff garbage",
    )
    .unwrap();
    let e = Error::from(PeftAdapter::load(dir.path()).unwrap_err());
    assert!(e.to_string().contains("adapter_model.safetensors"), "{e}");
    std::fs::write(dir.path().join("adapter_config.json"), b"{ not json").unwrap();
    assert!(PeftAdapter::load(dir.path()).is_err());
    // A truncated 4-bit checkpoint.
    let path = dir.path().join("model.safetensors");
    let src = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/checkpoints/tiny-llama-nf4-dq/model.safetensors"),
    )
    .unwrap();
    std::fs::write(&path, &src[..src.len() / 2]).unwrap();
    let file = qlora_checkpoint::MappedFile::open(&path).unwrap();
    assert!(file.checkpoint().is_err());
}
