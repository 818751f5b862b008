//! `Adam`: bitsandbytes' `Optimizer2State("adam")` (Adam, AdamW, Adam8bit, AdamW8bit,
//! Adam32bit, AdamW32bit) with parameter groups, a learning-rate schedule hook and state
//! save/load.

use crate::element::{TensorMut, TensorRef};
use crate::error::Error;
use crate::kernel::AdamStep;
use crate::schedule::LrSchedule;
use crate::state::{ParamState, StateKind, TensorData};
use crate::storage::{HostStorage, StateStorage};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

/// The safetensors metadata key of a saved optimizer state.
const META_KEY: &str = "qlora_optim";

/// Bits of the optimizer states (bitsandbytes' `optim_bits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OptimBits {
    /// 8-bit blockwise states for parameters with at least `min_8bit_size` elements.
    Eight,
    /// f32 states for every parameter.
    ThirtyTwo,
}

/// Hyper-parameters of an Adam-family optimizer (bitsandbytes' constructor arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// (β₁, β₂).
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (applied after the Adam step, CUDA order).
    pub weight_decay: f64,
    /// State precision.
    pub bits: OptimBits,
    /// Parameters with fewer elements keep f32 states even with [`OptimBits::Eight`] (4096).
    pub min_8bit_size: usize,
}

impl AdamConfig {
    fn base(bits: OptimBits, weight_decay: f64) -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay,
            bits,
            min_8bit_size: 4096,
        }
    }
    /// `bnb.optim.AdamW8bit` defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2.
    pub fn adamw8bit() -> Self {
        Self::base(OptimBits::Eight, 1e-2)
    }
    /// `bnb.optim.Adam8bit` defaults (weight decay 0).
    pub fn adam8bit() -> Self {
        Self::base(OptimBits::Eight, 0.0)
    }
    /// `bnb.optim.AdamW32bit` defaults (weight decay 1e-2).
    pub fn adamw32bit() -> Self {
        Self::base(OptimBits::ThirtyTwo, 1e-2)
    }
    /// `bnb.optim.Adam32bit` defaults (weight decay 0).
    pub fn adam32bit() -> Self {
        Self::base(OptimBits::ThirtyTwo, 0.0)
    }
    /// Set the learning rate.
    pub fn lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }
    /// Set (β₁, β₂).
    pub fn betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.betas = (beta1, beta2);
        self
    }
    /// Set ε.
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }
    /// Set the weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }
    /// Set `min_8bit_size`.
    pub fn min_8bit_size(mut self, n: usize) -> Self {
        self.min_8bit_size = n;
        self
    }

    fn hyper(&self) -> GroupHyper {
        GroupHyper {
            lr: self.lr,
            initial_lr: self.lr,
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// Per-group overrides of the optimizer's defaults (a torch parameter-group dict).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GroupOptions {
    /// Learning rate of the group.
    pub lr: Option<f64>,
    /// Weight decay of the group (QLoRA recipes often use 0 for biases and norms).
    pub weight_decay: Option<f64>,
    /// (β₁, β₂) of the group.
    pub betas: Option<(f64, f64)>,
    /// ε of the group.
    pub eps: Option<f64>,
}

/// The hyper-parameters of one group as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupHyper {
    /// Current learning rate.
    pub lr: f64,
    /// The learning rate schedules multiply (torch's `initial_lr`).
    pub initial_lr: f64,
    /// (β₁, β₂).
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Weight decay.
    pub weight_decay: f64,
}

impl GroupHyper {
    fn validate(&self) -> Result<(), Error> {
        // Python floats reach the kernels as C floats.
        AdamStep {
            lr: self.lr as f32,
            beta1: self.betas.0 as f32,
            beta2: self.betas.1 as f32,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
            step: 1,
            gnorm_scale: 1.0,
        }
        .validate()?;
        if !(self.initial_lr >= 0.0 && self.initial_lr.is_finite()) {
            return Err(Error::HyperParameter {
                name: "initial_lr",
                value: self.initial_lr,
                reason: "must be finite and >= 0",
            });
        }
        Ok(())
    }

    fn step_scalars(&self, gnorm_scale: f32) -> AdamStep {
        AdamStep {
            lr: self.lr as f32,
            beta1: self.betas.0 as f32,
            beta2: self.betas.1 as f32,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
            step: 1,
            gnorm_scale,
        }
    }
}

/// Identifies a registered parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId {
    /// Its parameter group.
    pub group: usize,
    /// Its position in the group.
    pub index: usize,
}

/// One parameter and its gradient for [`Adam::step`].
#[derive(Debug)]
pub struct ParamUpdate<'a> {
    /// Which parameter.
    pub id: ParamId,
    /// Its values, updated in place.
    pub param: TensorMut<'a>,
    /// Its gradient (same length; any of the three dtypes).
    pub grad: TensorRef<'a>,
}

#[derive(Debug)]
struct Slot<S: StateStorage> {
    numel: usize,
    state: Option<ParamState<S>>,
}

#[derive(Debug)]
struct Group<S: StateStorage> {
    hyper: GroupHyper,
    params: Vec<Slot<S>>,
}

/// Adam / AdamW with bitsandbytes' 32-bit or 8-bit blockwise states.
///
/// Parameters are registered with [`add_param`](Self::add_param) (their values stay with the
/// caller); each [`step`](Self::step) updates the parameters passed to it, creating their
/// states on first use exactly as bitsandbytes' `init_state` does (8-bit only for parameters
/// with at least `min_8bit_size` elements). Parameters without a gradient are simply not passed
/// (their step counter does not advance, as in bitsandbytes).
///
/// `S` decides where `state1`/`state2` live ([`HostStorage`] by default).
#[derive(Debug)]
pub struct Adam<S: StateStorage = HostStorage> {
    config: AdamConfig,
    groups: Vec<Group<S>>,
    storage: S,
}

impl Adam<HostStorage> {
    /// An optimizer with one (empty) parameter group using `config`, states in host memory.
    pub fn new(config: AdamConfig) -> Result<Self, Error> {
        Self::with_storage(config, HostStorage)
    }
}

impl<S: StateStorage> Adam<S> {
    /// An optimizer whose `state1`/`state2` tensors are allocated by `storage`.
    pub fn with_storage(config: AdamConfig, storage: S) -> Result<Self, Error> {
        let hyper = config.hyper();
        hyper.validate()?;
        Ok(Adam {
            config,
            groups: vec![Group {
                hyper,
                params: Vec::new(),
            }],
            storage,
        })
    }

    /// The defaults.
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// The state storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Add a parameter group with its own overrides; returns its index (group 0 always exists).
    pub fn add_param_group(&mut self, options: GroupOptions) -> Result<usize, Error> {
        let mut hyper = self.config.hyper();
        if let Some(lr) = options.lr {
            hyper.lr = lr;
            hyper.initial_lr = lr;
        }
        if let Some(wd) = options.weight_decay {
            hyper.weight_decay = wd;
        }
        if let Some(b) = options.betas {
            hyper.betas = b;
        }
        if let Some(e) = options.eps {
            hyper.eps = e;
        }
        hyper.validate()?;
        self.groups.push(Group {
            hyper,
            params: Vec::new(),
        });
        Ok(self.groups.len() - 1)
    }

    /// Register a parameter of `numel` elements in `group`.
    pub fn add_param(&mut self, group: usize, numel: usize) -> Result<ParamId, Error> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or(Error::UnknownGroup(group))?;
        g.params.push(Slot { numel, state: None });
        Ok(ParamId {
            group,
            index: g.params.len() - 1,
        })
    }

    /// Number of parameter groups.
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// The hyper-parameters of a group.
    pub fn group(&self, group: usize) -> Result<&GroupHyper, Error> {
        self.groups
            .get(group)
            .map(|g| &g.hyper)
            .ok_or(Error::UnknownGroup(group))
    }

    /// Set a group's current learning rate (its `initial_lr` is unchanged).
    pub fn set_lr(&mut self, group: usize, lr: f64) -> Result<(), Error> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or(Error::UnknownGroup(group))?;
        let mut hyper = g.hyper;
        hyper.lr = lr;
        hyper.validate()?;
        g.hyper = hyper;
        Ok(())
    }

    /// Set every group's learning rate to `initial_lr · schedule.factor(completed_steps)`.
    pub fn apply_schedule(
        &mut self,
        schedule: &LrSchedule,
        completed_steps: u64,
    ) -> Result<(), Error> {
        schedule.validate()?;
        let f = schedule.factor(completed_steps);
        for g in 0..self.groups.len() {
            let lr = self.groups[g].hyper.initial_lr * f;
            self.set_lr(g, lr)?;
        }
        Ok(())
    }

    /// The state of a parameter (None before its first update).
    pub fn state(&self, id: ParamId) -> Result<Option<&ParamState<S>>, Error> {
        Ok(self.slot(id)?.state.as_ref())
    }

    fn slot(&self, id: ParamId) -> Result<&Slot<S>, Error> {
        self.groups
            .get(id.group)
            .and_then(|g| g.params.get(id.index))
            .ok_or(Error::UnknownParam {
                group: id.group,
                index: id.index,
            })
    }

    /// The state kind a parameter of `numel` elements gets.
    pub fn kind_for(&self, numel: usize) -> StateKind {
        match self.config.bits {
            OptimBits::Eight if numel >= self.config.min_8bit_size => StateKind::Blockwise8bit,
            _ => StateKind::Full32bit,
        }
    }

    /// Bytes allocated for all states so far.
    pub fn state_bytes(&self) -> usize {
        self.groups
            .iter()
            .flat_map(|g| &g.params)
            .filter_map(|s| s.state.as_ref())
            .map(|s| s.allocated_bytes())
            .sum()
    }

    /// One optimizer step over the given parameters (`gnorm_scale = 1`).
    pub fn step(&mut self, updates: &mut [ParamUpdate<'_>]) -> Result<(), Error> {
        self.step_scaled(updates, 1.0)
    }

    /// One optimizer step with every gradient multiplied by `gnorm_scale` inside the kernels
    /// (the fused form of gradient clipping: pass [`GradClip::coef`](crate::GradClip)).
    ///
    /// All inputs are checked, and missing states allocated, before any parameter is touched:
    /// bad input or a failed allocation leaves every parameter and state unchanged. (Only a
    /// storage backend failing in the middle — a CUDA driver error while prefetching — can stop
    /// a step after some parameters were updated; those keep their consistent new state.)
    pub fn step_scaled(
        &mut self,
        updates: &mut [ParamUpdate<'_>],
        gnorm_scale: f32,
    ) -> Result<(), Error> {
        let mut seen = std::collections::HashSet::with_capacity(updates.len());
        for u in updates.iter() {
            let slot = self.slot(u.id)?;
            if !seen.insert(u.id) {
                return Err(Error::DuplicateParam {
                    group: u.id.group,
                    index: u.id.index,
                });
            }
            if u.param.len() != slot.numel {
                return Err(Error::length(
                    format!("param {}/{}", u.id.group, u.id.index),
                    slot.numel,
                    u.param.len(),
                ));
            }
            if u.grad.len() != slot.numel {
                return Err(Error::length(
                    format!("grad {}/{}", u.id.group, u.id.index),
                    slot.numel,
                    u.grad.len(),
                ));
            }
            self.groups[u.id.group]
                .hyper
                .step_scalars(gnorm_scale)
                .validate()?;
        }
        // Create missing states first, so that a failing allocation (a paged pool over its
        // budget) leaves every parameter untouched; states created here are dropped again.
        let mut created = Vec::new();
        for u in updates.iter() {
            let kind = self.kind_for(self.slot(u.id)?.numel);
            let slot = &mut self.groups[u.id.group].params[u.id.index];
            if slot.state.is_none() {
                match ParamState::new(kind, slot.numel, &self.storage) {
                    Ok(st) => {
                        slot.state = Some(st);
                        created.push(u.id);
                    }
                    Err(e) => {
                        for id in created {
                            self.groups[id.group].params[id.index].state = None;
                        }
                        return Err(e);
                    }
                }
            }
        }
        for u in updates.iter_mut() {
            let group = &mut self.groups[u.id.group];
            let hp = group.hyper.step_scalars(gnorm_scale);
            let state = group.params[u.id.index]
                .state
                .as_mut()
                .ok_or(Error::UnknownParam {
                    group: u.id.group,
                    index: u.id.index,
                })?;
            state.update(u.param.reborrow(), u.grad, &hp)?;
        }
        Ok(())
    }

    /// All states as safetensors bytes: parameter `i` (counting through the groups in order, as
    /// torch's `state_dict` does) is saved under `"{i}.state1"`, `"{i}.state2"`, `"{i}.absmax1"`,
    /// `"{i}.absmax2"`, `"{i}.qmap1"`, `"{i}.qmap2"`, `"{i}.step"`; the header metadata entry
    /// `qlora_optim` holds each group's hyper-parameters and each parameter's size as
    /// `key=value` lines, so [`load_state`](Self::load_state) can check that it resumes the same
    /// model. The bytes are deterministic.
    pub fn state_to_bytes(&self) -> Result<Vec<u8>, Error> {
        let mut tensors: Vec<(String, TensorData)> = Vec::new();
        // One metadata entry holding `key=value` lines in a fixed order: safetensors writes its
        // metadata map in hash order, and saved states should be byte-for-byte reproducible.
        let mut lines = vec![
            "format=qlora-optim/adam/1".to_string(),
            format!("groups={}", self.groups.len()),
        ];
        let mut i = 0usize;
        for (gi, g) in self.groups.iter().enumerate() {
            let h = &g.hyper;
            lines.push(format!("group.{gi}.lr={:?}", h.lr));
            lines.push(format!("group.{gi}.initial_lr={:?}", h.initial_lr));
            lines.push(format!("group.{gi}.beta1={:?}", h.betas.0));
            lines.push(format!("group.{gi}.beta2={:?}", h.betas.1));
            lines.push(format!("group.{gi}.eps={:?}", h.eps));
            lines.push(format!("group.{gi}.weight_decay={:?}", h.weight_decay));
            let sizes: Vec<String> = g.params.iter().map(|s| s.numel.to_string()).collect();
            lines.push(format!("group.{gi}.numel={}", sizes.join(",")));
            for slot in &g.params {
                if let Some(st) = &slot.state {
                    tensors.extend(st.to_tensors(&format!("{i}."))?);
                }
                i += 1;
            }
        }
        let meta = HashMap::from([(META_KEY.to_string(), lines.join("\n"))]);
        safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
            .map_err(|e| Error::st("optimizer state", e))
    }

    /// Write [`state_to_bytes`](Self::state_to_bytes) to `path` (through a temporary file in the
    /// same directory, renamed into place, so a failure leaves no partial file).
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let bytes = self.state_to_bytes()?;
        write_atomically(path.as_ref(), &bytes)
    }

    /// Replace all states and group hyper-parameters by those of a file written by
    /// [`save_state`](Self::save_state). The same parameters must be registered (same groups,
    /// same sizes, same order). Nothing changes when an error is returned.
    pub fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| Error::st("optimizer state", e))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::st("optimizer state", e))?;
        let meta: HashMap<String, String> = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .map(|text| {
                text.lines()
                    .filter_map(|l| l.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let get = |key: &str| -> Result<&String, Error> {
            meta.get(key).ok_or_else(|| Error::StateMismatch {
                param: "metadata".into(),
                reason: format!("missing key `{key}`"),
            })
        };
        let num = |key: &str| -> Result<f64, Error> {
            get(key)?.parse::<f64>().map_err(|_| Error::StateMismatch {
                param: "metadata".into(),
                reason: format!("`{key}` is not a number"),
            })
        };
        let groups: usize = get("groups")?.parse().map_err(|_| Error::StateMismatch {
            param: "metadata".into(),
            reason: "`groups` is not a number".into(),
        })?;
        if groups != self.groups.len() {
            return Err(Error::StateMismatch {
                param: "groups".into(),
                reason: format!(
                    "file has {groups} groups, optimizer has {}",
                    self.groups.len()
                ),
            });
        }
        let mut hypers = Vec::with_capacity(groups);
        let mut states = Vec::with_capacity(groups);
        let mut i = 0usize;
        for (gi, g) in self.groups.iter().enumerate() {
            let hyper = GroupHyper {
                lr: num(&format!("group.{gi}.lr"))?,
                initial_lr: num(&format!("group.{gi}.initial_lr"))?,
                betas: (
                    num(&format!("group.{gi}.beta1"))?,
                    num(&format!("group.{gi}.beta2"))?,
                ),
                eps: num(&format!("group.{gi}.eps"))?,
                weight_decay: num(&format!("group.{gi}.weight_decay"))?,
            };
            hyper.validate()?;
            let sizes = get(&format!("group.{gi}.numel"))?;
            let mine: Vec<String> = g.params.iter().map(|s| s.numel.to_string()).collect();
            if *sizes != mine.join(",") {
                return Err(Error::StateMismatch {
                    param: format!("group {gi}"),
                    reason: format!(
                        "saved parameter sizes [{sizes}] differ from registered [{}]",
                        mine.join(",")
                    ),
                });
            }
            let mut gs = Vec::with_capacity(g.params.len());
            for slot in &g.params {
                let prefix = format!("{i}.");
                let present = st.tensor(&format!("{prefix}step")).is_ok();
                let state = if present {
                    let s = ParamState::from_safetensors(&st, &prefix, slot.numel, &self.storage)?;
                    if s.kind() != self.kind_for(slot.numel) {
                        return Err(Error::StateMismatch {
                            param: format!("{i}"),
                            reason: format!(
                                "saved {:?} state, this optimizer uses {:?} for {} elements",
                                s.kind(),
                                self.kind_for(slot.numel),
                                slot.numel
                            ),
                        });
                    }
                    Some(s)
                } else {
                    None
                };
                gs.push(state);
                i += 1;
            }
            hypers.push(hyper);
            states.push(gs);
        }
        for ((g, h), gs) in self.groups.iter_mut().zip(hypers).zip(states) {
            g.hyper = h;
            for (slot, s) in g.params.iter_mut().zip(gs) {
                slot.state = s;
            }
        }
        Ok(())
    }

    /// [`load_state_bytes`](Self::load_state_bytes) from a file.
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        self.load_state_bytes(&bytes)
    }
}

/// Write `bytes` to `path` through a temporary file in the same directory and a rename
/// (`qlora_atomic_write::write_atomically`: the temporary `.NAME.tmp-PID` is removed on error, on
/// a signal once the program installed the clean-up, and by a later run if this one is killed).
/// An existing `path` is untouched when it fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    qlora_atomic_write::write_atomically(path, bytes).map_err(|e| Error::Io {
        path: e.path.display().to_string(),
        source: e.source,
    })
}
