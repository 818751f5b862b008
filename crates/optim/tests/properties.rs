//! Property tests: state serialization identity, and invariants of the 8-bit step.

use proptest::prelude::*;
use qlora_double_quant::DynamicMap;
use qlora_optim::{
    adam_step_8bit, AdamStep, Blockwise8bitMut, HostStorage, ParamState, StateKind, StateTensors,
    TensorData, TensorMut, TensorRef,
};

fn grads(n: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![
            8 => (-1.0f32..1.0, -8i32..2).prop_map(|(m, e)| m * 10f32.powi(e)),
            1 => Just(0.0f32),
            1 => prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(-0.0f32)],
        ],
        n,
    )
}

fn hp(step: u32) -> AdamStep {
    AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 1e-2,
        step,
        gnorm_scale: 1.0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn state_round_trips_through_safetensors(
        n in 1usize..1200,
        eight in any::<bool>(),
        steps in 1usize..4,
        seed_grads in grads(1200),
    ) {
        let kind = if eight { StateKind::Blockwise8bit } else { StateKind::Full32bit };
        let mut st = ParamState::new(kind, n, &HostStorage).unwrap();
        let mut p = vec![0.1f32; n];
        for s in 0..steps {
            let g: Vec<f32> = seed_grads.iter().cycle().skip(s * 7).take(n).copied().collect();
            st.update(TensorMut::F32(&mut p), TensorRef::F32(&g), &hp(1)).unwrap();
        }
        let tensors = st.to_tensors("x.").unwrap();
        let bytes = safetensors::serialize(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            None,
        )
        .unwrap();
        let view = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let back = ParamState::from_safetensors(&view, "x.", n, &HostStorage).unwrap();
        prop_assert_eq!(back.step(), steps as u32);
        prop_assert_eq!(back.kind(), kind);
        let again: Vec<(String, TensorData)> = back.to_tensors("x.").unwrap();
        prop_assert_eq!(again, tensors);
        // A different size does not load.
        prop_assert!(ParamState::from_safetensors(&view, "x.", n + 1, &HostStorage).is_err());
    }

    #[test]
    fn eight_bit_states_stay_within_their_absmax(n in 1usize..900, g in grads(900), steps in 1u32..5) {
        let nb = n.div_ceil(256);
        let (mut c1, mut c2, mut a1, mut a2) = (vec![0u8; n], vec![0u8; n], vec![0.0f32; nb], vec![0.0f32; nb]);
        let mut p = vec![0.5f32; n];
        for t in 1..=steps {
            adam_step_8bit(
                &mut p,
                &g[..n],
                Blockwise8bitMut { state1: &mut c1, state2: &mut c2, absmax1: &mut a1, absmax2: &mut a2 },
                &hp(t),
            )
            .unwrap();
        }
        let (q1, q2) = (DynamicMap::signed(), DynamicMap::unsigned());
        for i in 0..n {
            let (m, v) = (q1.decode(c1[i]) * a1[i / 256], q2.decode(c2[i]) * a2[i / 256]);
            prop_assert!(m.abs() <= a1[i / 256] || a1[i / 256].is_nan());
            prop_assert!(v >= 0.0 && v <= a2[i / 256]);
            // A non-finite gradient resets the second moment to 0 (code 0).
            if !g[i].is_finite() {
                prop_assert_eq!(c2[i], 0);
            }
        }
        prop_assert!(p.iter().all(|x| x.is_finite()));
        match ParamState::new(StateKind::Blockwise8bit, n, &HostStorage).unwrap().tensors() {
            StateTensors::Blockwise8bit { absmax1, .. } => prop_assert_eq!(absmax1.len(), nb),
            StateTensors::Full32bit { .. } => prop_assert!(false),
        }
    }
}
