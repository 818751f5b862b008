//! Fuzz qlora-optim's state readers: one parameter's state under bitsandbytes' names
//! (`ParamState::from_safetensors`) and a whole optimizer file (`Adam::load_state_bytes`);
//! whatever loads must also survive an update.
#![cfg_attr(fuzzing, no_main)]

use qlora_optim::{
    Adam, AdamConfig, AdamStep, HostStorage, ParamState, ParamUpdate, TensorMut, TensorRef,
};

fn check_optim_state(data: &[u8]) {
    let hp = AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
        step: 1,
        gnorm_scale: 1.0,
    };
    if let Ok(st) = safetensors::SafeTensors::deserialize(data) {
        for n in [4500usize, 1000] {
            if let Ok(mut state) = ParamState::from_safetensors(&st, "", n, &HostStorage) {
                let mut p = vec![0.1f32; n];
                let g = vec![1e-3f32; n];
                let _ = state.update(TensorMut::F32(&mut p), TensorRef::F32(&g), &hp);
            }
        }
    }
    for config in [AdamConfig::adamw8bit(), AdamConfig::adamw32bit()] {
        let Ok(mut opt) = Adam::new(config) else { return };
        let Ok(id) = opt.add_param(0, 4500) else { return };
        if opt.load_state_bytes(data).is_ok() {
            let mut p = vec![0.1f32; 4500];
            let g = vec![1e-3f32; 4500];
            let _ = opt.step(&mut [ParamUpdate {
                id,
                param: TensorMut::F32(&mut p),
                grad: TensorRef::F32(&g),
            }]);
        }
    }
}

qlora_fuzz::target!(
    "optim_state",
    [
        include_bytes!("../../testdata/optim/adamw8bit_n4500.out.safetensors").as_slice(),
        include_bytes!("../../testdata/optim/adamw32bit_n1000.out.safetensors").as_slice(),
    ],
    check_optim_state
);
