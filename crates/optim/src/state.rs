//! The optimizer state of one parameter, and its safetensors form under bitsandbytes' names.

use crate::element::{Element, TensorMut, TensorRef};
use crate::error::Error;
use crate::kernel::{adam_step_32bit, adam_step_8bit, AdamStep, Blockwise8bitMut};
use crate::storage::{StateBuffer, StateStorage};
use qlora_double_quant::{DynamicMap, OPTIMIZER_BLOCKSIZE};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors, View};
use std::borrow::Cow;

/// Which kind of state a parameter has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateKind {
    /// `state1`/`state2` as u8 codes of the signed/unsigned dynamic maps, one f32 absmax per
    /// 256 elements each: `2 + 8/256` bytes per parameter.
    Blockwise8bit,
    /// `state1`/`state2` in f32: 8 bytes per parameter.
    Full32bit,
}

impl StateKind {
    /// Exact state bytes of a parameter of `n` elements: `2n + 8·ceil(n/256)` (8-bit) or `8n`.
    pub fn state_bytes(self, n: usize) -> usize {
        match self {
            StateKind::Blockwise8bit => 2 * n + 8 * n.div_ceil(OPTIMIZER_BLOCKSIZE),
            StateKind::Full32bit => 8 * n,
        }
    }

    /// Bytes per parameter for large tensors: `2 + 8/256 = 2.03125` or `8`.
    pub fn bytes_per_param(self) -> f64 {
        match self {
            StateKind::Blockwise8bit => 2.0 + 8.0 / OPTIMIZER_BLOCKSIZE as f64,
            StateKind::Full32bit => 8.0,
        }
    }
}

/// The tensors of one state.
#[derive(Debug)]
pub enum StateTensors<S: StateStorage> {
    /// 8-bit blockwise states.
    Blockwise8bit {
        /// First-moment codes.
        state1: S::U8,
        /// Second-moment codes.
        state2: S::U8,
        /// First-moment absmax per 256-block (ordinary memory, as in bitsandbytes).
        absmax1: Vec<f32>,
        /// Second-moment absmax per 256-block.
        absmax2: Vec<f32>,
    },
    /// f32 states.
    Full32bit {
        /// First moment.
        state1: S::F32,
        /// Second moment.
        state2: S::F32,
    },
}

/// The state of one parameter (bitsandbytes' `optimizer.state[p]`).
#[derive(Debug)]
pub struct ParamState<S: StateStorage> {
    step: u32,
    numel: usize,
    tensors: StateTensors<S>,
}

impl<S: StateStorage> ParamState<S> {
    /// Fresh zero state (bitsandbytes' `init_state`): all codes 0, absmax 0, `step = 0`.
    pub fn new(kind: StateKind, numel: usize, storage: &S) -> Result<Self, Error> {
        let tensors = match kind {
            StateKind::Blockwise8bit => {
                let nb = numel.div_ceil(OPTIMIZER_BLOCKSIZE);
                StateTensors::Blockwise8bit {
                    state1: storage.alloc_u8(numel, numel)?,
                    state2: storage.alloc_u8(numel, numel)?,
                    absmax1: vec![0.0; nb],
                    absmax2: vec![0.0; nb],
                }
            }
            StateKind::Full32bit => StateTensors::Full32bit {
                state1: storage.alloc_f32(numel, numel)?,
                state2: storage.alloc_f32(numel, numel)?,
            },
        };
        Ok(ParamState {
            step: 0,
            numel,
            tensors,
        })
    }

    /// The number of updates applied so far.
    pub fn step(&self) -> u32 {
        self.step
    }

    /// Number of parameter elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// 8-bit or 32-bit.
    pub fn kind(&self) -> StateKind {
        match self.tensors {
            StateTensors::Blockwise8bit { .. } => StateKind::Blockwise8bit,
            StateTensors::Full32bit { .. } => StateKind::Full32bit,
        }
    }

    /// The tensors.
    pub fn tensors(&self) -> &StateTensors<S> {
        &self.tensors
    }

    /// Bytes allocated for this state (`state1`, `state2`, and `absmax1`/`absmax2` for 8-bit).
    pub fn allocated_bytes(&self) -> usize {
        match &self.tensors {
            StateTensors::Blockwise8bit {
                state1,
                state2,
                absmax1,
                absmax2,
            } => {
                state1.allocated_bytes()
                    + state2.allocated_bytes()
                    + (absmax1.capacity() + absmax2.capacity()) * 4
            }
            StateTensors::Full32bit { state1, state2 } => {
                state1.allocated_bytes() + state2.allocated_bytes()
            }
        }
    }

    /// Prefetch `state1` and `state2` (paged storage), as bitsandbytes does before each update.
    pub fn prefetch(&mut self) -> Result<(), Error> {
        match &mut self.tensors {
            StateTensors::Blockwise8bit { state1, state2, .. } => {
                state1.prefetch()?;
                state2.prefetch()
            }
            StateTensors::Full32bit { state1, state2 } => {
                state1.prefetch()?;
                state2.prefetch()
            }
        }
    }

    /// Apply one update: increments `step`, then runs the 8-bit or 32-bit kernel with
    /// `hp.step` replaced by the new step.
    pub fn update(
        &mut self,
        param: TensorMut<'_>,
        grad: TensorRef<'_>,
        hp: &AdamStep,
    ) -> Result<(), Error> {
        if param.len() != self.numel {
            return Err(Error::length("param", self.numel, param.len()));
        }
        if grad.len() != self.numel {
            return Err(Error::length("grad", self.numel, grad.len()));
        }
        let step = self.step.checked_add(1).ok_or(Error::HyperParameter {
            name: "step",
            value: self.step as f64,
            reason: "step counter overflow",
        })?;
        let hp = AdamStep { step, ..*hp };
        hp.validate()?;
        self.prefetch()?;
        match &mut self.tensors {
            StateTensors::Blockwise8bit {
                state1,
                state2,
                absmax1,
                absmax2,
            } => {
                let st = Blockwise8bitMut {
                    state1: state1.as_mut_slice()?,
                    state2: state2.as_mut_slice()?,
                    absmax1,
                    absmax2,
                };
                dispatch(param, grad, Dispatch8 { st, hp: &hp })?;
            }
            StateTensors::Full32bit { state1, state2 } => {
                let s1 = state1.as_mut_slice()?;
                let s2 = state2.as_mut_slice()?;
                dispatch(param, grad, Dispatch32 { s1, s2, hp: &hp })?;
            }
        }
        self.step = step;
        Ok(())
    }

    /// The state as safetensors entries under bitsandbytes' names, each prefixed by `prefix`:
    /// `state1`, `state2` (u8 or f32), and for 8-bit states `absmax1`, `absmax2` (f32),
    /// `qmap1`, `qmap2` (f32\[256\]); `step` as an i64 scalar.
    pub fn to_tensors(&self, prefix: &str) -> Result<Vec<(String, TensorData)>, Error> {
        let n = self.numel;
        let mut out = Vec::with_capacity(7);
        match &self.tensors {
            StateTensors::Blockwise8bit {
                state1,
                state2,
                absmax1,
                absmax2,
            } => {
                out.push((
                    format!("{prefix}state1"),
                    TensorData::u8(vec![n], state1.as_slice()?),
                ));
                out.push((
                    format!("{prefix}state2"),
                    TensorData::u8(vec![n], state2.as_slice()?),
                ));
                out.push((
                    format!("{prefix}absmax1"),
                    TensorData::f32(vec![absmax1.len()], absmax1),
                ));
                out.push((
                    format!("{prefix}absmax2"),
                    TensorData::f32(vec![absmax2.len()], absmax2),
                ));
                out.push((
                    format!("{prefix}qmap1"),
                    TensorData::f32(vec![256], DynamicMap::signed().values()),
                ));
                out.push((
                    format!("{prefix}qmap2"),
                    TensorData::f32(vec![256], DynamicMap::unsigned().values()),
                ));
            }
            StateTensors::Full32bit { state1, state2 } => {
                out.push((
                    format!("{prefix}state1"),
                    TensorData::f32(vec![n], state1.as_slice()?),
                ));
                out.push((
                    format!("{prefix}state2"),
                    TensorData::f32(vec![n], state2.as_slice()?),
                ));
            }
        }
        out.push((
            format!("{prefix}step"),
            TensorData {
                dtype: StDtype::I64,
                shape: vec![],
                data: (self.step as i64).to_le_bytes().to_vec(),
            },
        ));
        Ok(out)
    }

    /// Read a state written by [`to_tensors`](Self::to_tensors) (or by bitsandbytes, converted to
    /// safetensors) for a parameter of `numel` elements. The kind follows `state1`'s dtype (u8 or
    /// f32); `qmap1`/`qmap2` must be bitsandbytes' maps when present; `step` may be an i64/i32
    /// scalar or one-element tensor.
    pub fn from_safetensors(
        st: &SafeTensors<'_>,
        prefix: &str,
        numel: usize,
        storage: &S,
    ) -> Result<Self, Error> {
        let get = |key: &str| -> Result<TensorView<'_>, Error> {
            let name = format!("{prefix}{key}");
            st.tensor(&name).map_err(|_| Error::MissingTensor(name))
        };
        let step_view = get("step")?;
        let step = read_step(&format!("{prefix}step"), &step_view)?;
        let s1 = get("state1")?;
        let kind = match s1.dtype() {
            StDtype::U8 => StateKind::Blockwise8bit,
            StDtype::F32 => StateKind::Full32bit,
            other => {
                return Err(Error::Dtype {
                    name: format!("{prefix}state1"),
                    expected: "U8 or F32".into(),
                    found: format!("{other:?}"),
                })
            }
        };
        let mut state = ParamState::new(kind, numel, storage)?;
        state.step = step;
        let nb = numel.div_ceil(OPTIMIZER_BLOCKSIZE);
        match &mut state.tensors {
            StateTensors::Blockwise8bit {
                state1,
                state2,
                absmax1,
                absmax2,
            } => {
                copy_u8(
                    &format!("{prefix}state1"),
                    &s1,
                    numel,
                    state1.as_mut_slice()?,
                )?;
                copy_u8(
                    &format!("{prefix}state2"),
                    &get("state2")?,
                    numel,
                    state2.as_mut_slice()?,
                )?;
                copy_f32(&format!("{prefix}absmax1"), &get("absmax1")?, nb, absmax1)?;
                copy_f32(&format!("{prefix}absmax2"), &get("absmax2")?, nb, absmax2)?;
                for (key, map) in [
                    ("qmap1", DynamicMap::signed()),
                    ("qmap2", DynamicMap::unsigned()),
                ] {
                    let name = format!("{prefix}{key}");
                    if let Ok(view) = st.tensor(&name) {
                        let mut q = [0.0f32; 256];
                        copy_f32(&name, &view, 256, &mut q)?;
                        let same = q
                            .iter()
                            .zip(map.values())
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        if !same {
                            return Err(Error::QuantMap(name));
                        }
                    }
                }
            }
            StateTensors::Full32bit { state1, state2 } => {
                copy_f32(
                    &format!("{prefix}state1"),
                    &s1,
                    numel,
                    state1.as_mut_slice()?,
                )?;
                copy_f32(
                    &format!("{prefix}state2"),
                    &get("state2")?,
                    numel,
                    state2.as_mut_slice()?,
                )?;
            }
        }
        Ok(state)
    }
}

fn read_step(name: &str, v: &TensorView<'_>) -> Result<u32, Error> {
    let count: usize = v.shape().iter().product();
    if count != 1 {
        return Err(Error::Shape {
            name: name.into(),
            expected: vec![],
            found: v.shape().to_vec(),
        });
    }
    let value: i64 = match v.dtype() {
        StDtype::I64 => i64::from_le_bytes(v.data()[..8].try_into().expect("8 bytes")),
        StDtype::I32 => i32::from_le_bytes(v.data()[..4].try_into().expect("4 bytes")) as i64,
        other => {
            return Err(Error::Dtype {
                name: name.into(),
                expected: "I64 or I32".into(),
                found: format!("{other:?}"),
            })
        }
    };
    u32::try_from(value)
        .ok()
        .filter(|&s| s <= i32::MAX as u32)
        .ok_or_else(|| Error::StateMismatch {
            param: name.into(),
            reason: format!("step {value} is outside 0..=i32::MAX"),
        })
}

fn check_view(name: &str, v: &TensorView<'_>, dtype: StDtype, len: usize) -> Result<(), Error> {
    if v.dtype() != dtype {
        return Err(Error::Dtype {
            name: name.into(),
            expected: format!("{dtype:?}"),
            found: format!("{:?}", v.dtype()),
        });
    }
    let count: usize = v.shape().iter().product();
    if count != len {
        return Err(Error::Shape {
            name: name.into(),
            expected: vec![len],
            found: v.shape().to_vec(),
        });
    }
    Ok(())
}

fn copy_u8(name: &str, v: &TensorView<'_>, len: usize, out: &mut [u8]) -> Result<(), Error> {
    check_view(name, v, StDtype::U8, len)?;
    out.copy_from_slice(v.data());
    Ok(())
}

/// Copy an f32 tensor's little-endian bytes into `out` (no alignment assumptions).
pub(crate) fn copy_f32(
    name: &str,
    v: &TensorView<'_>,
    len: usize,
    out: &mut [f32],
) -> Result<(), Error> {
    check_view(name, v, StDtype::F32, len)?;
    for (o, b) in out.iter_mut().zip(v.data().chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// An owned tensor ready to be written with `safetensors::serialize`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// Element type.
    pub dtype: StDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl TensorData {
    /// An f32 tensor.
    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        TensorData {
            dtype: StDtype::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
    /// A u8 tensor.
    pub fn u8(shape: Vec<usize>, values: &[u8]) -> Self {
        TensorData {
            dtype: StDtype::U8,
            shape,
            data: values.to_vec(),
        }
    }
}

impl View for &TensorData {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Runs a generic kernel on the dtype combination of a parameter and its gradient.
trait DtypeKernel {
    fn run<P: Element, G: Element>(self, p: &mut [P], g: &[G]) -> Result<(), Error>;
}

struct Dispatch8<'a, 'h> {
    st: Blockwise8bitMut<'a>,
    hp: &'h AdamStep,
}
impl DtypeKernel for Dispatch8<'_, '_> {
    fn run<P: Element, G: Element>(self, p: &mut [P], g: &[G]) -> Result<(), Error> {
        adam_step_8bit(p, g, self.st, self.hp)
    }
}

struct Dispatch32<'a, 'h> {
    s1: &'a mut [f32],
    s2: &'a mut [f32],
    hp: &'h AdamStep,
}
impl DtypeKernel for Dispatch32<'_, '_> {
    fn run<P: Element, G: Element>(self, p: &mut [P], g: &[G]) -> Result<(), Error> {
        adam_step_32bit(p, g, self.s1, self.s2, self.hp)
    }
}

/// Runs `kernel` on the concrete slices of any of the nine dtype combinations.
fn dispatch<K: DtypeKernel>(
    param: TensorMut<'_>,
    grad: TensorRef<'_>,
    kernel: K,
) -> Result<(), Error> {
    use TensorMut as M;
    use TensorRef as R;
    match (param, grad) {
        (M::F32(p), R::F32(g)) => kernel.run(p, g),
        (M::F32(p), R::Bf16(g)) => kernel.run(p, g),
        (M::F32(p), R::F16(g)) => kernel.run(p, g),
        (M::Bf16(p), R::F32(g)) => kernel.run(p, g),
        (M::Bf16(p), R::Bf16(g)) => kernel.run(p, g),
        (M::Bf16(p), R::F16(g)) => kernel.run(p, g),
        (M::F16(p), R::F32(g)) => kernel.run(p, g),
        (M::F16(p), R::Bf16(g)) => kernel.run(p, g),
        (M::F16(p), R::F16(g)) => kernel.run(p, g),
    }
}
