//! The candle optimizers give exactly qlora-optim's trajectories (same parameters bit for bit,
//! same state codes), resume exactly from saved states, and refuse bad input with errors.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use qlora_candle::{AdamW32bit, AdamW8bit, PagedAdamW32bit, PagedAdamW8bit};
use qlora_optim::{Adam, AdamConfig, ParamUpdate, StateStorage, TensorMut, TensorRef};
use qlora_paged_alloc::{Pool, PoolConfig};

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// (shape, dtype) of the test's variables: an 8-bit-state one, one small enough for f32
/// states, a bf16 one, and one large enough to be paged (≥ 10⁵ elements).
const VARS: [(&[usize], DType); 4] = [
    (&[64, 128], DType::F32),
    (&[32, 16], DType::F32),
    (&[48, 128], DType::BF16),
    (&[320, 320], DType::F32),
];

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 3e-3,
        beta1: 0.85,
        beta2: 0.99,
        eps: 1e-7,
        weight_decay: 0.05,
    }
}

fn make_vars() -> Vec<Var> {
    VARS.iter()
        .enumerate()
        .map(|(i, (shape, dtype))| {
            let n = shape.iter().product();
            let t = Tensor::from_vec(values(n, i as u64 + 1, 1.0), *shape, &Device::Cpu)
                .unwrap()
                .to_dtype(*dtype)
                .unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect()
}

/// The gradient of variable `i` at step `step` (also what the loss Σ var ⊙ G gives).
fn grad(i: usize, step: usize) -> Tensor {
    let (shape, dtype) = VARS[i];
    let n = shape.iter().product();
    Tensor::from_vec(
        values(n, 100 * step as u64 + i as u64, 0.5),
        shape,
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap()
}

fn run_candle<O: Optimizer<Config = ParamsAdamW>>(
    vars: &[Var],
    opt: &mut O,
    steps: std::ops::Range<usize>,
) {
    for step in steps {
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (i, v) in vars.iter().enumerate() {
            let term = (v.as_tensor() * grad(i, step))
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            loss = (loss + term).unwrap();
        }
        opt.backward_step(&loss).unwrap();
    }
}

enum Host {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

fn run_reference<S: StateStorage>(opt: &mut Adam<S>, steps: usize) -> Vec<Host> {
    let mut host: Vec<Host> = make_vars()
        .iter()
        .map(|v| {
            let t = v.as_tensor().flatten_all().unwrap();
            match v.dtype() {
                DType::BF16 => Host::Bf16(t.to_vec1().unwrap()),
                _ => Host::F32(t.to_vec1().unwrap()),
            }
        })
        .collect();
    let ids: Vec<_> = VARS
        .iter()
        .map(|(s, _)| opt.add_param(0, s.iter().product()).unwrap())
        .collect();
    for step in 0..steps {
        let grads: Vec<Host> = (0..VARS.len())
            .map(|i| {
                let g = grad(i, step).flatten_all().unwrap();
                match VARS[i].1 {
                    DType::BF16 => Host::Bf16(g.to_vec1().unwrap()),
                    _ => Host::F32(g.to_vec1().unwrap()),
                }
            })
            .collect();
        let mut updates: Vec<ParamUpdate<'_>> = host
            .iter_mut()
            .zip(&grads)
            .zip(&ids)
            .map(|((p, g), id)| ParamUpdate {
                id: *id,
                param: match p {
                    Host::F32(v) => TensorMut::F32(v),
                    Host::Bf16(v) => TensorMut::Bf16(v),
                },
                grad: match g {
                    Host::F32(v) => TensorRef::F32(v),
                    Host::Bf16(v) => TensorRef::Bf16(v),
                },
            })
            .collect();
        opt.step(&mut updates).unwrap();
    }
    host
}

fn assert_same_params(vars: &[Var], want: &[Host], what: &str) {
    for (i, (v, w)) in vars.iter().zip(want).enumerate() {
        let t = v.as_tensor().flatten_all().unwrap();
        match w {
            Host::F32(w) => {
                let got: Vec<f32> = t.to_vec1().unwrap();
                let same = got.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{what}: variable {i} differs from qlora-optim");
            }
            Host::Bf16(w) => {
                let got: Vec<half::bf16> = t.to_vec1().unwrap();
                assert_eq!(&got, w, "{what}: variable {i} differs from qlora-optim");
            }
        }
    }
}

fn config(base: AdamConfig) -> AdamConfig {
    let p = params();
    base.lr(p.lr)
        .betas(p.beta1, p.beta2)
        .eps(p.eps)
        .weight_decay(p.weight_decay)
}

fn pool() -> Pool {
    Pool::new(PoolConfig::host(1 << 30)).unwrap()
}

const STEPS: usize = 5;

#[test]
fn adamw8bit_equals_qlora_optim() {
    let vars = make_vars();
    let mut opt = AdamW8bit::new(vars.clone(), params()).unwrap();
    run_candle(&vars, &mut opt, 0..STEPS);
    let mut reference = Adam::new(config(AdamConfig::adamw8bit())).unwrap();
    let want = run_reference(&mut reference, STEPS);
    assert_same_params(&vars, &want, "AdamW8bit");
    assert_eq!(
        opt.state().state_to_bytes().unwrap(),
        reference.state_to_bytes().unwrap(),
        "AdamW8bit: state codes differ"
    );
    // 8-bit states for the large variables, f32 for the 512-element one.
    assert_eq!(opt.state().inner().state_bytes(), reference.state_bytes());
}

#[test]
fn adamw32bit_equals_qlora_optim() {
    let vars = make_vars();
    let mut opt = AdamW32bit::new(vars.clone(), params()).unwrap();
    run_candle(&vars, &mut opt, 0..STEPS);
    let mut reference = Adam::new(config(AdamConfig::adamw32bit())).unwrap();
    let want = run_reference(&mut reference, STEPS);
    assert_same_params(&vars, &want, "AdamW32bit");
    assert_eq!(
        opt.state().state_to_bytes().unwrap(),
        reference.state_to_bytes().unwrap()
    );
}

#[test]
fn paged_adamw_equals_qlora_optim_paged() {
    let vars = make_vars();
    let mut opt = PagedAdamW8bit::new(vars.clone(), params()).unwrap();
    run_candle(&vars, &mut opt, 0..STEPS);
    let mut reference = Adam::paged(config(AdamConfig::adamw8bit()), pool()).unwrap();
    let want = run_reference(&mut reference, STEPS);
    assert_same_params(&vars, &want, "PagedAdamW8bit");
    assert_eq!(
        opt.state().state_to_bytes().unwrap(),
        reference.state_to_bytes().unwrap()
    );
    // The 102400-element variable's states live in the pool.
    assert!(opt.state().inner().storage().pool().stats().bytes_in_use > 0);

    let vars = make_vars();
    let mut opt = PagedAdamW32bit::new(vars.clone(), params()).unwrap();
    run_candle(&vars, &mut opt, 0..STEPS);
    let mut reference = Adam::paged(config(AdamConfig::adamw32bit()), pool()).unwrap();
    let want = run_reference(&mut reference, STEPS);
    assert_same_params(&vars, &want, "PagedAdamW32bit");

    let vars = make_vars();
    let mut opt = PagedAdamW8bit::with_pool(vars.clone(), params(), pool()).unwrap();
    run_candle(&vars, &mut opt, 0..2);
    assert!(opt.state().inner().state_bytes() > 0);
}

#[test]
fn saved_states_resume_exactly() {
    let straight = make_vars();
    let mut opt = AdamW8bit::new(straight.clone(), params()).unwrap();
    run_candle(&straight, &mut opt, 0..4);

    let resumed = make_vars();
    let mut first = AdamW8bit::new(resumed.clone(), params()).unwrap();
    run_candle(&resumed, &mut first, 0..2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    first.state().save_state(&path).unwrap();
    // bitsandbytes' names.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    for key in [
        "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2", "step",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(key)),
            "no {key} in {names:?}"
        );
    }
    let mut second = AdamW8bit::new(resumed.clone(), params()).unwrap();
    second.state_mut().load_state(&path).unwrap();
    run_candle(&resumed, &mut second, 2..4);
    for (a, b) in straight.iter().zip(&resumed) {
        let (a, b) = (
            a.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap(),
            b.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap(),
        );
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    }
    assert_eq!(
        opt.state().state_to_bytes().unwrap(),
        second.state().state_to_bytes().unwrap()
    );
}

#[test]
fn learning_rate_round_trips_and_bad_input_is_an_error() {
    let vars = make_vars();
    let mut opt = AdamW8bit::new(vars, params()).unwrap();
    assert_eq!(opt.learning_rate(), 3e-3);
    opt.set_learning_rate(1e-4);
    assert_eq!(opt.learning_rate(), 1e-4);
    // A corrupt state file.
    let e = opt
        .state_mut()
        .load_state_bytes(b"definitely not safetensors")
        .unwrap_err();
    assert!(!e.to_string().is_empty());
    // A state file for other variables.
    let mut other = AdamW8bit::new(
        vec![Var::zeros((4096, 2), DType::F32, &Device::Cpu).unwrap()],
        params(),
    )
    .unwrap();
    let v = Var::zeros((4096, 2), DType::F32, &Device::Cpu).unwrap();
    let loss = v.as_tensor().sum_all().unwrap();
    let mut with_state = AdamW8bit::new(vec![v], params()).unwrap();
    with_state.backward_step(&loss).unwrap();
    let bytes = with_state.state().state_to_bytes().unwrap();
    assert!(opt.state_mut().load_state_bytes(&bytes).is_err());
    assert!(other.state_mut().load_state_bytes(&bytes).is_ok());
    // Integer variables are refused.
    let ints = Var::from_tensor(&Tensor::zeros(8, DType::U32, &Device::Cpu).unwrap()).unwrap();
    let e = AdamW8bit::new(vec![ints], params()).unwrap_err();
    assert!(e.to_string().contains("U32"), "{e}");
    // A non-finite learning rate is refused at construction.
    let bad = ParamsAdamW {
        lr: f64::NAN,
        ..params()
    };
    assert!(AdamW32bit::new(make_vars(), bad).is_err());
}
