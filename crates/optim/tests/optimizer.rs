//! The optimizer layer: memory per parameter, `min_8bit_size`, parameter groups, schedules,
//! clipping, save/load with exact resume, typed errors, threading independence, paged states.

use half::bf16;
use qlora_optim::{
    adam_step_32bit, adam_step_8bit, clip_coefficient, clip_grad_norm, global_grad_norm,
    warmup_steps_from_ratio, Adam, AdamConfig, AdamStep, Blockwise8bitMut, Error, GroupOptions,
    HostStorage, LrSchedule, PagedAdam, ParamId, ParamUpdate, Pool, PoolConfig, StateBuffer,
    StateKind, StateStorage, StateTensors, TensorMut, TensorRef, PAGED_MIN_NUMEL,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect()
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn memory_per_parameter_is_what_the_docs_state() {
    for n in [4096usize, 1 << 20, (1 << 20) + 100] {
        let mut opt = Adam::new(AdamConfig::adamw8bit()).unwrap();
        let id = opt.add_param(0, n).unwrap();
        let mut p = vec![0.0f32; n];
        let g = vec![1e-3f32; n];
        opt.step(&mut [ParamUpdate {
            id,
            param: TensorMut::F32(&mut p),
            grad: TensorRef::F32(&g),
        }])
        .unwrap();
        let st = opt.state(id).unwrap().unwrap();
        assert_eq!(st.kind(), StateKind::Blockwise8bit);
        // 2 bytes of codes per parameter plus two f32 absmax per 256 parameters.
        assert_eq!(st.allocated_bytes(), 2 * n + 8 * n.div_ceil(256));
        assert_eq!(
            StateKind::Blockwise8bit.state_bytes(n),
            2 * n + 8 * n.div_ceil(256)
        );
        if n % 256 == 0 {
            let per = st.allocated_bytes() as f64 / n as f64;
            assert_eq!(per, 2.0 + 8.0 / 256.0);
            assert_eq!(per, StateKind::Blockwise8bit.bytes_per_param());
        }
        assert_eq!(opt.state_bytes(), st.allocated_bytes());

        let mut opt = Adam::new(AdamConfig::adamw32bit()).unwrap();
        let id = opt.add_param(0, n).unwrap();
        opt.step(&mut [ParamUpdate {
            id,
            param: TensorMut::F32(&mut p),
            grad: TensorRef::F32(&g),
        }])
        .unwrap();
        let st = opt.state(id).unwrap().unwrap();
        assert_eq!(st.kind(), StateKind::Full32bit);
        assert_eq!(st.allocated_bytes(), 8 * n);
        assert_eq!(StateKind::Full32bit.bytes_per_param(), 8.0);
    }
}

#[test]
fn min_8bit_size_boundary() {
    let opt = Adam::new(AdamConfig::adamw8bit()).unwrap();
    assert_eq!(opt.kind_for(4095), StateKind::Full32bit);
    assert_eq!(opt.kind_for(4096), StateKind::Blockwise8bit);
    let opt = Adam::new(AdamConfig::adamw8bit().min_8bit_size(100)).unwrap();
    assert_eq!(opt.kind_for(100), StateKind::Blockwise8bit);
    let opt = Adam::new(AdamConfig::adamw32bit()).unwrap();
    assert_eq!(opt.kind_for(1 << 20), StateKind::Full32bit);
}

#[test]
fn parameter_groups_use_their_own_hyper_parameters() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut opt = Adam::new(AdamConfig::adamw8bit().lr(1e-3)).unwrap();
    let g1 = opt
        .add_param_group(GroupOptions {
            lr: Some(5e-3),
            weight_decay: Some(0.0),
            ..Default::default()
        })
        .unwrap();
    let a = opt.add_param(0, 5000).unwrap();
    let b = opt.add_param(g1, 5000).unwrap();
    let (mut pa, mut pb) = (randn(&mut rng, 5000, 0.1), randn(&mut rng, 5000, 0.1));
    let (ga, gb) = (randn(&mut rng, 5000, 1e-2), randn(&mut rng, 5000, 1e-2));
    let (mut ra, mut rb) = (pa.clone(), pb.clone());
    opt.step(&mut [
        ParamUpdate {
            id: a,
            param: TensorMut::F32(&mut pa),
            grad: TensorRef::F32(&ga),
        },
        ParamUpdate {
            id: b,
            param: TensorMut::F32(&mut pb),
            grad: TensorRef::F32(&gb),
        },
    ])
    .unwrap();
    // The same through the kernel with each group's scalars.
    for (p, g, lr, wd) in [(&mut ra, &ga, 1e-3f32, 1e-2f32), (&mut rb, &gb, 5e-3, 0.0)] {
        let (mut c1, mut c2, mut a1, mut a2) = (
            vec![0u8; 5000],
            vec![0u8; 5000],
            vec![0.0; 20],
            vec![0.0; 20],
        );
        adam_step_8bit(
            p,
            g,
            Blockwise8bitMut {
                state1: &mut c1,
                state2: &mut c2,
                absmax1: &mut a1,
                absmax2: &mut a2,
            },
            &AdamStep {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: wd,
                step: 1,
                gnorm_scale: 1.0,
            },
        )
        .unwrap();
    }
    assert_eq!(f32_bits(&pa), f32_bits(&ra));
    assert_eq!(f32_bits(&pb), f32_bits(&rb));
    assert_eq!(opt.group(g1).unwrap().lr, 5e-3);
}

#[test]
fn schedules_match_transformers() {
    let s = LrSchedule::ConstantWithWarmup { warmup_steps: 10 };
    assert_eq!(
        (s.factor(0), s.factor(5), s.factor(10), s.factor(1000)),
        (0.0, 0.5, 1.0, 1.0)
    );
    let s = LrSchedule::Linear {
        warmup_steps: 10,
        total_steps: 110,
    };
    assert_eq!(
        (
            s.factor(5),
            s.factor(10),
            s.factor(60),
            s.factor(110),
            s.factor(200)
        ),
        (0.5, 1.0, 0.5, 0.0, 0.0)
    );
    let s = LrSchedule::Cosine {
        warmup_steps: 10,
        total_steps: 110,
        num_cycles: 0.5,
    };
    assert_eq!(s.factor(10), 1.0);
    assert!((s.factor(35) - 0.853_553_390_593_273_7).abs() < 1e-15);
    assert!((s.factor(60) - 0.5).abs() < 1e-15);
    assert!(s.factor(110).abs() < 1e-15);
    assert_eq!(LrSchedule::Constant.factor(7), 1.0);
    // QLoRA: constant schedule, warmup_ratio 0.03 of 10 000 steps.
    assert_eq!(warmup_steps_from_ratio(10_000, 0.03).unwrap(), 300);
    assert!(warmup_steps_from_ratio(10, 1.5).is_err());
    assert!(LrSchedule::Linear {
        warmup_steps: 5,
        total_steps: 4
    }
    .validate()
    .is_err());

    let mut opt = Adam::new(AdamConfig::adamw32bit().lr(2e-4)).unwrap();
    let g = opt
        .add_param_group(GroupOptions {
            lr: Some(1e-3),
            ..Default::default()
        })
        .unwrap();
    let sched = LrSchedule::ConstantWithWarmup { warmup_steps: 4 };
    opt.apply_schedule(&sched, 1).unwrap();
    assert_eq!(opt.group(0).unwrap().lr, 2e-4 * 0.25);
    assert_eq!(opt.group(g).unwrap().lr, 1e-3 * 0.25);
    opt.apply_schedule(&sched, 9).unwrap();
    assert_eq!(opt.group(g).unwrap().lr, 1e-3);
}

#[test]
fn clipping_scales_to_max_norm_and_the_fused_form_agrees() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut g1 = randn(&mut rng, 6000, 1.0);
    let mut g2: Vec<bf16> = randn(&mut rng, 300, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let before = global_grad_norm(&[TensorRef::F32(&g1), TensorRef::Bf16(&g2)]);
    assert!(before > 10.0);
    let orig = g1.clone();
    let clip = clip_grad_norm(
        &mut [TensorMut::F32(&mut g1), TensorMut::Bf16(&mut g2)],
        0.3,
    )
    .unwrap();
    assert_eq!(clip.total_norm, before);
    assert_eq!(clip.coef, (0.3 / (before + 1e-6)) as f32);
    let after = global_grad_norm(&[TensorRef::F32(&g1), TensorRef::Bf16(&g2)]);
    assert!((after - 0.3).abs() < 1e-3, "{after}");
    // Under the bound: untouched.
    let mut small = vec![1e-3f32; 10];
    let c = clip_grad_norm(&mut [TensorMut::F32(&mut small)], 0.3).unwrap();
    assert_eq!(c.coef, 1.0);
    assert!(small.iter().all(|&x| x == 1e-3));
    assert!(clip_coefficient(1.0, 0.0).is_err());
    assert!(clip_coefficient(1.0, f64::NAN).is_err());

    // Fused: step_scaled(coef) on the raw f32 gradient == step on the pre-scaled one (8-bit).
    let n = 6000;
    let p0 = randn(&mut rng, n, 0.1);
    let (mut pa, mut pb) = (p0.clone(), p0);
    let mut oa = Adam::new(AdamConfig::adamw8bit()).unwrap();
    let mut ob = Adam::new(AdamConfig::adamw8bit()).unwrap();
    let (ia, ib) = (oa.add_param(0, n).unwrap(), ob.add_param(0, n).unwrap());
    oa.step_scaled(
        &mut [ParamUpdate {
            id: ia,
            param: TensorMut::F32(&mut pa),
            grad: TensorRef::F32(&orig),
        }],
        clip.coef,
    )
    .unwrap();
    ob.step(&mut [ParamUpdate {
        id: ib,
        param: TensorMut::F32(&mut pb),
        grad: TensorRef::F32(&g1),
    }])
    .unwrap();
    assert_eq!(f32_bits(&pa), f32_bits(&pb));
}

/// Three parameters in two groups: an 8-bit f32 one, a small (f32-state) one, a bf16 8-bit one.
struct Model {
    p: Vec<f32>,
    q: Vec<f32>,
    r: Vec<bf16>,
    ids: [ParamId; 3],
}

fn model<S: StateStorage>(opt: &mut Adam<S>, rng: &mut ChaCha8Rng) -> Model {
    let g = opt
        .add_param_group(GroupOptions {
            lr: Some(3e-3),
            weight_decay: Some(0.0),
            ..Default::default()
        })
        .unwrap();
    let ids = [
        opt.add_param(0, 150_000).unwrap(),
        opt.add_param(g, 1000).unwrap(),
        opt.add_param(g, 5000).unwrap(),
    ];
    Model {
        p: randn(rng, 150_000, 0.1),
        q: randn(rng, 1000, 0.1),
        r: randn(rng, 5000, 0.1)
            .into_iter()
            .map(bf16::from_f32)
            .collect(),
        ids,
    }
}

fn train<S: StateStorage>(opt: &mut Adam<S>, m: &mut Model, rng: &mut ChaCha8Rng, steps: usize) {
    for _ in 0..steps {
        let gp = randn(rng, 150_000, 1e-2);
        let gq = randn(rng, 1000, 1e-2);
        let gr: Vec<bf16> = randn(rng, 5000, 1e-2)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        opt.step(&mut [
            ParamUpdate {
                id: m.ids[0],
                param: TensorMut::F32(&mut m.p),
                grad: TensorRef::F32(&gp),
            },
            ParamUpdate {
                id: m.ids[1],
                param: TensorMut::F32(&mut m.q),
                grad: TensorRef::F32(&gq),
            },
            ParamUpdate {
                id: m.ids[2],
                param: TensorMut::Bf16(&mut m.r),
                grad: TensorRef::Bf16(&gr),
            },
        ])
        .unwrap();
    }
}

fn snapshot(m: &Model) -> (Vec<u32>, Vec<u32>, Vec<u16>) {
    (
        f32_bits(&m.p),
        f32_bits(&m.q),
        m.r.iter().map(|x| x.to_bits()).collect(),
    )
}

#[test]
fn save_and_load_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optim.safetensors");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut a = Adam::new(AdamConfig::adamw8bit()).unwrap();
    let mut ma = model(&mut a, &mut rng);
    train(&mut a, &mut ma, &mut rng, 3);
    a.set_lr(0, 7e-4).unwrap();
    a.save_state(&path).unwrap();
    let mut mb = Model {
        p: ma.p.clone(),
        q: ma.q.clone(),
        r: ma.r.clone(),
        ids: ma.ids,
    };
    let mut rng_b = rng.clone();
    train(&mut a, &mut ma, &mut rng, 3);

    let mut b = Adam::new(AdamConfig::adamw8bit()).unwrap();
    let _ = model(&mut b, &mut ChaCha8Rng::seed_from_u64(99));
    b.load_state(&path).unwrap();
    assert_eq!(b.group(0).unwrap().lr, 7e-4);
    assert_eq!(b.state(mb.ids[0]).unwrap().unwrap().step(), 3);
    train(&mut b, &mut mb, &mut rng_b, 3);
    assert_eq!(snapshot(&ma), snapshot(&mb));
    assert_eq!(a.state_to_bytes().unwrap(), b.state_to_bytes().unwrap());
}

#[test]
fn load_rejects_mismatched_files_and_changes_nothing() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut a = Adam::new(AdamConfig::adamw8bit()).unwrap();
    let mut ma = model(&mut a, &mut rng);
    train(&mut a, &mut ma, &mut rng, 1);
    let bytes = a.state_to_bytes().unwrap();

    // Different sizes registered.
    let mut b = Adam::new(AdamConfig::adamw8bit()).unwrap();
    b.add_param(0, 150_001).unwrap();
    let g = b.add_param_group(GroupOptions::default()).unwrap();
    b.add_param(g, 1000).unwrap();
    b.add_param(g, 5000).unwrap();
    assert!(matches!(
        b.load_state_bytes(&bytes),
        Err(Error::StateMismatch { .. })
    ));
    assert!(b.state(ParamId { group: 0, index: 0 }).unwrap().is_none());
    // 32-bit optimizer reading 8-bit states.
    let mut c = Adam::new(AdamConfig::adamw32bit()).unwrap();
    let _ = model(&mut c, &mut ChaCha8Rng::seed_from_u64(5));
    assert!(matches!(
        c.load_state_bytes(&bytes),
        Err(Error::StateMismatch { .. })
    ));
    // Garbage, and a file with a corrupted map or a missing tensor.
    let mut d = Adam::new(AdamConfig::adamw8bit()).unwrap();
    let _ = model(&mut d, &mut ChaCha8Rng::seed_from_u64(6));
    assert!(matches!(
        d.load_state_bytes(b"not safetensors"),
        Err(Error::SafeTensors { .. })
    ));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let rebuild = |edit: &dyn Fn(&str, &mut qlora_optim::TensorData) -> bool| -> Vec<u8> {
        let mut tensors = Vec::new();
        for (k, v) in st.tensors() {
            let mut t = qlora_optim::TensorData {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            if edit(&k, &mut t) {
                tensors.push((k, t));
            }
        }
        safetensors::serialize(
            tensors.iter().map(|(k, v)| (k.as_str(), v)),
            header.metadata().clone(),
        )
        .unwrap()
    };
    let bad_map = rebuild(&|k, t| {
        if k == "0.qmap1" {
            t.data[0] ^= 1;
        }
        true
    });
    assert!(matches!(d.load_state_bytes(&bad_map), Err(Error::QuantMap(n)) if n == "0.qmap1"));
    let missing = rebuild(&|k, _| k != "2.absmax2");
    assert!(
        matches!(d.load_state_bytes(&missing), Err(Error::MissingTensor(n)) if n == "2.absmax2")
    );
    let bad_dtype = rebuild(&|k, t| {
        if k == "1.state2" {
            t.dtype = safetensors::Dtype::I32;
        }
        true
    });
    assert!(matches!(
        d.load_state_bytes(&bad_dtype),
        Err(Error::Dtype { .. })
    ));
    assert!(d.state(ParamId { group: 0, index: 0 }).unwrap().is_none());
}

#[test]
fn bad_calls_are_typed_errors_and_change_nothing() {
    let mut opt = Adam::new(AdamConfig::adamw8bit()).unwrap();
    let id = opt.add_param(0, 5000).unwrap();
    let mut p = vec![0.5f32; 5000];
    let g = vec![0.1f32; 4999];
    let r = opt.step(&mut [ParamUpdate {
        id,
        param: TensorMut::F32(&mut p),
        grad: TensorRef::F32(&g),
    }]);
    assert!(matches!(
        r,
        Err(Error::Length {
            expected: 5000,
            found: 4999,
            ..
        })
    ));
    let g = vec![0.1f32; 5000];
    let mut p2 = vec![0.5f32; 5000];
    let r = opt.step(&mut [
        ParamUpdate {
            id,
            param: TensorMut::F32(&mut p),
            grad: TensorRef::F32(&g),
        },
        ParamUpdate {
            id,
            param: TensorMut::F32(&mut p2),
            grad: TensorRef::F32(&g),
        },
    ]);
    assert!(matches!(r, Err(Error::DuplicateParam { .. })));
    let r = opt.step(&mut [ParamUpdate {
        id: ParamId { group: 0, index: 9 },
        param: TensorMut::F32(&mut p),
        grad: TensorRef::F32(&g),
    }]);
    assert!(matches!(r, Err(Error::UnknownParam { group: 0, index: 9 })));
    assert!(p.iter().all(|&x| x == 0.5));
    assert!(opt.state(id).unwrap().is_none());
    assert!(matches!(opt.add_param(3, 10), Err(Error::UnknownGroup(3))));
    for cfg in [
        AdamConfig::adamw8bit().betas(1.0, 0.999),
        AdamConfig::adamw8bit().betas(0.9, -0.1),
        AdamConfig::adamw8bit().lr(f64::NAN),
        AdamConfig::adamw8bit().eps(-1.0),
        AdamConfig::adamw8bit().weight_decay(f64::INFINITY),
    ] {
        assert!(matches!(Adam::new(cfg), Err(Error::HyperParameter { .. })));
    }
    assert!(opt.set_lr(0, -1.0).is_err());
    let bad = AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 0,
        gnorm_scale: 1.0,
    };
    assert!(adam_step_32bit(&mut p, &g, &mut [0.0; 5000], &mut [0.0; 5000], &bad).is_err());
    let ok = AdamStep { step: 1, ..bad };
    assert!(matches!(
        adam_step_32bit(&mut p, &g, &mut [0.0; 5000], &mut [0.0; 4000], &ok),
        Err(Error::Length { .. })
    ));
}

#[test]
fn results_do_not_depend_on_threading() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let n = 300_001;
    let p0 = randn(&mut rng, n, 0.1);
    let g = randn(&mut rng, n, 1e-2);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut p = p0.clone();
            let mut q = p0.clone();
            let (mut c1, mut c2) = (vec![0u8; n], vec![0u8; n]);
            let nb = n.div_ceil(256);
            let (mut a1, mut a2) = (vec![0.0; nb], vec![0.0; nb]);
            let (mut s1, mut s2) = (vec![0.0; n], vec![0.0; n]);
            for step in 1..=3 {
                let hp = AdamStep {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 1e-2,
                    step,
                    gnorm_scale: 1.0,
                };
                adam_step_8bit(
                    &mut p,
                    &g,
                    Blockwise8bitMut {
                        state1: &mut c1,
                        state2: &mut c2,
                        absmax1: &mut a1,
                        absmax2: &mut a2,
                    },
                    &hp,
                )
                .unwrap();
                adam_step_32bit(&mut q, &g, &mut s1, &mut s2, &hp).unwrap();
            }
            (
                f32_bits(&p),
                c1,
                c2,
                f32_bits(&a1),
                f32_bits(&q),
                f32_bits(&s2),
            )
        })
    };
    assert_eq!(run(1), run(4));
}

#[test]
fn thirty_two_bit_path_propagates_non_finite_gradients() {
    // Unlike the 8-bit kernel, kOptimizer32bit2State has no NaN mask.
    let mut p = vec![1.0f32; 4];
    let g = [0.1, f32::NAN, f32::INFINITY, 0.0];
    let (mut s1, mut s2) = ([0.0f32; 4], [0.0f32; 4]);
    let hp = AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        gnorm_scale: 1.0,
    };
    adam_step_32bit(&mut p, &g, &mut s1, &mut s2, &hp).unwrap();
    assert!(p[0] < 1.0 && p[1].is_nan() && p[2].is_nan() && p[3] == 1.0);
}

#[test]
fn paged_adamw_gives_the_same_numbers_as_unpaged_on_the_host_backend() {
    for cfg in [AdamConfig::adamw8bit(), AdamConfig::adamw32bit()] {
        let pool = Pool::new(PoolConfig::host(64 << 20)).unwrap();
        let mut paged = PagedAdam::paged(cfg.clone(), pool.clone()).unwrap();
        let mut plain = Adam::with_storage(cfg.clone(), HostStorage).unwrap();
        let mut rng_a = ChaCha8Rng::seed_from_u64(8);
        let mut rng_b = rng_a.clone();
        let mut ma = model(&mut paged, &mut rng_a);
        let mut mb = model(&mut plain, &mut rng_b);
        train(&mut paged, &mut ma, &mut rng_a, 4);
        train(&mut plain, &mut mb, &mut rng_b, 4);
        assert_eq!(snapshot(&ma), snapshot(&mb), "{:?}", cfg.bits);
        assert_eq!(
            paged.state_to_bytes().unwrap(),
            plain.state_to_bytes().unwrap()
        );

        // Only the 150 000-element parameter (>= 1e5) is paged; its two states are prefetched
        // before each of its 4 updates, and they are the pool's only buffers (no copies).
        let big = paged.state(ma.ids[0]).unwrap().unwrap();
        let expect_bytes = match big.tensors() {
            StateTensors::Blockwise8bit { state1, state2, .. } => {
                assert!(state1.is_paged() && state2.is_paged());
                assert_eq!(state1.as_slice().unwrap().len(), 150_000);
                2 * 150_000
            }
            StateTensors::Full32bit { state1, state2 } => {
                assert!(state1.is_paged() && state2.is_paged());
                2 * 4 * 150_000
            }
        };
        for id in &ma.ids[1..] {
            let small = paged.state(*id).unwrap().unwrap();
            let paged_small = match small.tensors() {
                StateTensors::Blockwise8bit { state1, .. } => state1.is_paged(),
                StateTensors::Full32bit { state1, .. } => state1.is_paged(),
            };
            assert!(!paged_small);
        }
        const { assert!(150_000 >= PAGED_MIN_NUMEL && 5000 < PAGED_MIN_NUMEL) };
        let stats = pool.stats();
        assert_eq!(stats.prefetches_to_device, 2 * 4);
        assert_eq!(stats.live_buffers, 2);
        assert_eq!(stats.bytes_allocated, expect_bytes);

        // Resume into a fresh paged optimizer, then continue both: identical.
        let bytes = paged.state_to_bytes().unwrap();
        let pool2 = Pool::new(PoolConfig::host(64 << 20)).unwrap();
        let mut resumed = PagedAdam::paged(cfg.clone(), pool2).unwrap();
        let _ = model(&mut resumed, &mut ChaCha8Rng::seed_from_u64(0));
        resumed.load_state_bytes(&bytes).unwrap();
        let mut mc = Model {
            p: ma.p.clone(),
            q: ma.q.clone(),
            r: ma.r.clone(),
            ids: ma.ids,
        };
        let mut rng_c = rng_a.clone();
        train(&mut paged, &mut ma, &mut rng_a, 2);
        train(&mut resumed, &mut mc, &mut rng_c, 2);
        assert_eq!(snapshot(&ma), snapshot(&mc));
    }
}

#[test]
fn paged_pool_budget_exhaustion_is_a_storage_error() {
    let pool = Pool::new(PoolConfig::host(1 << 16)).unwrap();
    let mut opt = PagedAdam::paged(AdamConfig::adamw8bit(), pool).unwrap();
    let id = opt.add_param(0, 200_000).unwrap();
    let mut p = vec![0.0f32; 200_000];
    let g = vec![0.1f32; 200_000];
    let r = opt.step(&mut [ParamUpdate {
        id,
        param: TensorMut::F32(&mut p),
        grad: TensorRef::F32(&g),
    }]);
    assert!(matches!(r, Err(Error::Storage(_))), "{r:?}");
    assert!(p.iter().all(|&x| x == 0.0));
    // With a small parameter first in the same step: it is not updated either, and keeps no state.
    let small = opt.add_param(0, 5000).unwrap();
    let mut q = vec![0.0f32; 5000];
    let gq = vec![0.1f32; 5000];
    let r = opt.step(&mut [
        ParamUpdate {
            id: small,
            param: TensorMut::F32(&mut q),
            grad: TensorRef::F32(&gq),
        },
        ParamUpdate {
            id,
            param: TensorMut::F32(&mut p),
            grad: TensorRef::F32(&g),
        },
    ]);
    assert!(matches!(r, Err(Error::Storage(_))));
    assert!(q.iter().all(|&x| x == 0.0));
    assert!(opt.state(small).unwrap().is_none());
}
