//! What the tests against bitsandbytes' recorded trajectories share (`bnb_vectors.rs`: its CPU
//! backend, `bnb_cuda.rs`: its CUDA kernels): reading the safetensors files of `testdata/` and
//! replaying a trajectory through [`Adam`].

use qlora_optim::{Adam, AdamConfig, ParamId, ParamUpdate, TensorMut, TensorRef};
use safetensors::SafeTensors;
use std::path::PathBuf;

/// `testdata/<rel>` of the workspace.
pub(crate) fn testdata(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(rel)
}

/// The f32 tensor `name` of `st` (panics, naming it, when missing or of another dtype).
pub(crate) fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The u8 tensor `name` of `st` (panics, naming it, when missing or of another dtype).
pub(crate) fn u8s(st: &SafeTensors<'_>, name: &str) -> Vec<u8> {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
    assert_eq!(t.dtype(), safetensors::Dtype::U8, "{name}");
    t.data().to_vec()
}

/// The fraction of equal codes of two equally long code vectors.
pub(crate) fn equal_fraction(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

/// Run a recorded trajectory (one gradient per step, from `p0`) through a fresh [`Adam`] with
/// `config`; returns the optimizer, the parameter's id and the parameter after each step.
pub(crate) fn replay(
    config: AdamConfig,
    p0: &[f32],
    grads: &[Vec<f32>],
) -> (Adam, ParamId, Vec<Vec<f32>>) {
    let mut opt = Adam::new(config).unwrap();
    let id = opt.add_param(0, p0.len()).unwrap();
    let mut p = p0.to_vec();
    let mut traj = Vec::new();
    for g in grads {
        opt.step(&mut [ParamUpdate {
            id,
            param: TensorMut::F32(&mut p),
            grad: TensorRef::F32(g),
        }])
        .unwrap();
        traj.push(p.clone());
    }
    (opt, id, traj)
}
