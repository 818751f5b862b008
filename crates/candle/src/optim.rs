//! bitsandbytes' AdamW with 8-bit blockwise or f32 states, paged or not, as
//! [`candle_nn::Optimizer`]s over candle [`Var`]s: [`AdamW8bit`], [`AdamW32bit`],
//! [`PagedAdamW8bit`], [`PagedAdamW32bit`].
//!
//! Each step hands every variable that has a gradient to `qlora-optim`'s [`Adam`] through a
//! candle in-place op: the parameter is updated where candle stores it, no copy. The states,
//! their codes and the trajectories are exactly `qlora-optim`'s (same kernels, same order).
//!
//! **On a CUDA device** (feature `cuda`; all variables of one optimizer on one device) the
//! states live on the device — 8-bit codes and absmax, or f32 moments — and each step launches
//! `qlora-cuda`'s fused 8-bit / 32-bit AdamW kernel on the variable's own `CudaSlice`, in place,
//! on candle's stream, with the same hyper-parameters, per-variable step counts and bias
//! corrections as the CPU path. The paged optimizers keep `state1`/`state2` of variables with at
//! least 10⁵ elements in a `qlora-paged-alloc` CUDA pool (managed memory, prefetched to the
//! device before each update; the pool never asks for more than the card reports free). State
//! files are the CPU path's: copied to the host and written under bitsandbytes' names, so a CPU
//! optimizer resumes from a CUDA one's file and back.

use crate::error::{device_name, Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Var};
use candle_nn::ParamsAdamW;
use qlora_optim::{
    Adam, AdamConfig, HostStorage, PagedStorage, ParamId, ParamUpdate, StateStorage, TensorMut,
    TensorRef,
};
use qlora_paged_alloc::{Pool, PoolConfig};
use std::cell::RefCell;
use std::path::Path;

/// The variables and the `qlora-optim` optimizer behind every candle optimizer of this module.
#[derive(Debug)]
pub struct AdamVars<S: StateStorage> {
    opt: Adam<S>,
    vars: Vec<(Var, ParamId)>,
    /// The device states when the variables live on a CUDA device.
    #[cfg(feature = "cuda")]
    cuda: Option<crate::cuda::CudaAdam>,
}

/// Where the states of a paged optimizer go when its variables are on a CUDA device.
#[derive(Clone)]
enum Paging {
    /// Not a paged optimizer.
    No,
    /// A CUDA pool on the variables' device, created on demand.
    NewPool,
    /// The caller's pool (must be a CUDA pool on the variables' device).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Pool(Pool),
}

impl<S: StateStorage> AdamVars<S> {
    fn new(vars: Vec<Var>, config: AdamConfig, storage: S, paging: Paging) -> Result<Self> {
        let device = vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        for (i, var) in vars.iter().enumerate() {
            if !var.device().same_device(&device) {
                return Err(Error::Optimizer(format!(
                    "variable {i} is on {}, variable 0 on {}: one optimizer updates the \
                     variables of one device",
                    device_name(var.device()),
                    device_name(&device)
                )));
            }
        }
        #[cfg(feature = "cuda")]
        let cuda = match &device {
            Device::Cuda(dev) => Some(crate::cuda::CudaAdam::new(
                dev,
                vars.len(),
                cuda_pool(dev, paging)?,
            )?),
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = paging;
        let mut opt = Adam::with_storage(config, storage)?;
        let mut out = Vec::with_capacity(vars.len());
        for (i, var) in vars.into_iter().enumerate() {
            match var.dtype() {
                DType::F32 | DType::BF16 | DType::F16 => {}
                other => {
                    return Err(Error::Optimizer(format!(
                        "variable {i} has dtype {other:?}; AdamW updates f32, bf16 and f16 only"
                    )))
                }
            }
            let supported =
                var.device().is_cpu() || (cfg!(feature = "cuda") && var.device().is_cuda());
            if !supported {
                return Err(Error::Optimizer(format!(
                    "variable {i} is on {}; this build updates {} variables only",
                    device_name(var.device()),
                    if cfg!(feature = "cuda") {
                        "CPU and CUDA"
                    } else {
                        "CPU"
                    }
                )));
            }
            let id = opt.add_param(0, var.elem_count())?;
            out.push((var, id));
        }
        Ok(AdamVars {
            opt,
            vars: out,
            #[cfg(feature = "cuda")]
            cuda,
        })
    }

    /// One step over every variable with a gradient in `grads` (others keep their state and
    /// step count, as in bitsandbytes).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (i, (var, id)) in self.vars.iter().enumerate() {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            if grad.dims() != var.dims() {
                return Err(Error::Shape {
                    what: format!("gradient of variable {i}"),
                    expected: var.dims().to_vec(),
                    found: grad.dims().to_vec(),
                });
            }
            #[cfg(feature = "cuda")]
            if let Some(cuda) = &mut self.cuda {
                if grad.dtype() != var.dtype() {
                    return Err(Error::Dtype {
                        what: format!("gradient of variable {i}"),
                        expected: format!("{:?} (the variable's)", var.dtype()),
                        found: grad.dtype(),
                    });
                }
                crate::error::check_device(
                    &format!("gradient of variable {i}"),
                    grad,
                    var.device(),
                )?;
                let grad = grad.contiguous()?;
                let hyper = *self.opt.group(0)?;
                let kind = self.opt.kind_for(var.elem_count());
                cuda.step(i, kind, var.as_tensor(), &grad, &hyper)?;
                continue;
            }
            let grad = grad.contiguous()?;
            let op = StepOp {
                opt: RefCell::new(&mut self.opt),
                id: *id,
            };
            var.as_tensor().inplace_op2(&grad, &op)?;
        }
        Ok(())
    }

    /// The `qlora-optim` optimizer (states, codes, step counts). For variables on a CUDA
    /// device it holds the configuration, the hyper-parameters and the registered sizes only:
    /// the states are on the device ([`state_bytes`](Self::state_bytes),
    /// [`state_to_bytes`](Self::state_to_bytes)).
    pub fn inner(&self) -> &Adam<S> {
        &self.opt
    }

    /// Bytes of all optimizer states so far (device memory and paged blocks for CUDA
    /// variables).
    pub fn state_bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            return cuda.state_bytes();
        }
        self.opt.state_bytes()
    }

    /// The device of the variables (the CPU for none).
    pub fn device(&self) -> Device {
        self.vars
            .first()
            .map(|(v, _)| v.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// The variables, in the order given (the order of the state file's indices).
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.vars.iter().map(|(v, _)| v)
    }

    /// The learning rate of the (single) parameter group.
    pub fn learning_rate(&self) -> f64 {
        self.opt.group(0).map(|g| g.lr).unwrap_or(f64::NAN)
    }

    /// Set the learning rate.
    pub fn set_learning_rate(&mut self, lr: f64) {
        // Group 0 always exists; a non-finite lr is refused by qlora-optim and left unchanged.
        let _ = self.opt.set_lr(0, lr);
    }

    /// Save the states as safetensors under bitsandbytes' names (`{i}.state1`, `{i}.absmax1`,
    /// …, `i` the variable's position), written atomically.
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.state_to_bytes()?;
        Ok(qlora_optim::write_atomically(path.as_ref(), &bytes)?)
    }

    /// The state file's bytes (for CUDA variables the device states copied to the host: the
    /// same bytes the CPU path writes for the same states).
    pub fn state_to_bytes(&self) -> Result<Vec<u8>> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &self.cuda {
            // The metadata (hyper-parameters, sizes) is qlora-optim's own, from the optimizer
            // that holds no states on this path; the tensors are the device states.
            let meta_file = self.opt.state_to_bytes()?;
            let meta = file_metadata(&meta_file)?;
            let tensors = cuda.to_tensors()?;
            return safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), meta)
                .map_err(|e| Error::Optimizer(format!("serializing the state: {e}")));
        }
        Ok(self.opt.state_to_bytes()?)
    }

    /// Load states saved by [`save_state`](Self::save_state) for the same variables (shapes,
    /// kinds and names checked; a corrupt file is an error, never a panic).
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.cuda.is_some() {
            let path = path.as_ref();
            let bytes = std::fs::read(path).map_err(|source| qlora_optim::Error::Io {
                path: path.display().to_string(),
                source,
            })?;
            return self.load_state_bytes(&bytes);
        }
        Ok(self.opt.load_state(path)?)
    }

    /// Load states from bytes.
    pub fn load_state_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(cuda) = &mut self.cuda {
            // qlora-optim reads and checks the file into host states ...
            let mut host = Adam::new(self.opt.config().clone())?;
            let ids = self
                .vars
                .iter()
                .map(|(v, _)| host.add_param(0, v.elem_count()))
                .collect::<Result<Vec<_>, _>>()?;
            host.load_state_bytes(bytes)?;
            let loaded = ids
                .iter()
                .map(|&id| host.state(id))
                .collect::<Result<Vec<_>, _>>()?;
            // ... which are uploaded; the hyper-parameters go to the optimizer from a file of
            // the same metadata without tensors (so it keeps no host copy of the states).
            let staged = cuda.stage(&loaded)?;
            let meta_only = safetensors::serialize(
                std::iter::empty::<(&str, &qlora_optim::TensorData)>(),
                file_metadata(bytes)?,
            )
            .map_err(|e| Error::Optimizer(format!("serializing the state metadata: {e}")))?;
            self.opt.load_state_bytes(&meta_only)?;
            cuda.commit(staged);
            return Ok(());
        }
        Ok(self.opt.load_state_bytes(bytes)?)
    }
}

/// The metadata of a safetensors file.
#[cfg(feature = "cuda")]
fn file_metadata(bytes: &[u8]) -> Result<Option<std::collections::HashMap<String, String>>> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Optimizer(format!("reading the state file: {e}")))?;
    Ok(header.metadata().clone())
}

/// The CUDA pool of a paged optimizer over variables on `dev` (none for a non-paged one).
#[cfg(feature = "cuda")]
fn cuda_pool(dev: &candle_core::CudaDevice, paging: Paging) -> Result<Option<Pool>> {
    let ordinal = dev.cuda_stream().context().ordinal();
    match paging {
        Paging::No => Ok(None),
        Paging::NewPool => Ok(Some(Pool::new(PoolConfig::cuda(
            ordinal,
            PAGED_POOL_BUDGET,
        ))?)),
        Paging::Pool(pool) => match pool.backend() {
            qlora_paged_alloc::Backend::Cuda { ordinal: o } if o == ordinal => Ok(Some(pool)),
            other => Err(Error::Optimizer(format!(
                "the paged pool is {other:?}, the variables are on CUDA device {ordinal}: \
                 give a PoolConfig::cuda({ordinal}, …) pool"
            ))),
        },
    }
}

/// bitsandbytes' config from candle's AdamW parameters.
fn config(base: AdamConfig, p: &ParamsAdamW) -> AdamConfig {
    base.lr(p.lr)
        .betas(p.beta1, p.beta2)
        .eps(p.eps)
        .weight_decay(p.weight_decay)
}

/// The in-place update of one variable by its gradient.
struct StepOp<'a, S: StateStorage> {
    opt: RefCell<&'a mut Adam<S>>,
    id: ParamId,
}

impl<S: StateStorage> InplaceOp2 for StepOp<'_, S> {
    fn name(&self) -> &'static str {
        "qlora-adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let contiguous = |l: &Layout, what: &str| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::from(Error::Optimizer(format!("{what} is not contiguous")))
            })
        };
        let (p0, p1) = contiguous(l1, "parameter")?;
        let (g0, g1) = contiguous(l2, "gradient")?;
        let param = match s1 {
            CpuStorage::F32(v) => TensorMut::F32(&mut v[p0..p1]),
            CpuStorage::BF16(v) => TensorMut::Bf16(&mut v[p0..p1]),
            CpuStorage::F16(v) => TensorMut::F16(&mut v[p0..p1]),
            _ => {
                return Err(
                    Error::Optimizer("parameter dtype is not f32, bf16 or f16".into()).into(),
                )
            }
        };
        let grad = match s2 {
            CpuStorage::F32(v) => TensorRef::F32(&v[g0..g1]),
            CpuStorage::BF16(v) => TensorRef::Bf16(&v[g0..g1]),
            CpuStorage::F16(v) => TensorRef::F16(&v[g0..g1]),
            _ => {
                return Err(
                    Error::Optimizer("gradient dtype is not f32, bf16 or f16".into()).into(),
                )
            }
        };
        self.opt
            .borrow_mut()
            .step(&mut [ParamUpdate {
                id: self.id,
                param,
                grad,
            }])
            .map_err(|e| Error::from(e).into())
    }
}

macro_rules! adam_optimizer {
    ($(#[$doc:meta])* $name:ident, $storage:ty, $base:expr, $make_storage:expr, $paging:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name(AdamVars<$storage>);

        impl $name {
            /// The variables and states.
            pub fn state(&self) -> &AdamVars<$storage> {
                &self.0
            }

            /// The variables and states, mutably (save/load).
            pub fn state_mut(&mut self) -> &mut AdamVars<$storage> {
                &mut self.0
            }

            /// The optimizer over `vars` with a full `qlora-optim` config (e.g. a lower
            /// `min_8bit_size`, as bitsandbytes' constructor argument). The state precision is
            /// this type's: `config.bits` is overridden.
            pub fn with_config(vars: Vec<Var>, config: AdamConfig) -> Result<Self> {
                let make: fn() -> Result<$storage> = $make_storage;
                let config = AdamConfig {
                    bits: $base.bits,
                    ..config
                };
                Ok($name(AdamVars::new(vars, config, make()?, $paging)?))
            }
        }

        impl candle_nn::Optimizer for $name {
            type Config = ParamsAdamW;

            fn new(vars: Vec<Var>, params: ParamsAdamW) -> candle_core::Result<Self> {
                let make: fn() -> Result<$storage> = $make_storage;
                Ok($name(AdamVars::new(
                    vars,
                    config($base, &params),
                    make()?,
                    $paging,
                )?))
            }

            fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
                Ok(self.0.step(grads)?)
            }

            fn learning_rate(&self) -> f64 {
                self.0.learning_rate()
            }

            fn set_learning_rate(&mut self, lr: f64) {
                self.0.set_learning_rate(lr)
            }
        }
    };
}

/// Bytes a paged optimizer's host pool may hold (states are allocated on first use; the budget
/// only caps them).
pub const PAGED_POOL_BUDGET: usize = 1 << 40;

fn host_storage() -> Result<HostStorage> {
    Ok(HostStorage)
}

fn paged_storage() -> Result<PagedStorage> {
    Ok(PagedStorage::new(Pool::new(PoolConfig::host(
        PAGED_POOL_BUDGET,
    ))?))
}

adam_optimizer!(
    /// `bnb.optim.AdamW8bit`: 8-bit blockwise states (2 bytes + 8/256 per parameter) for
    /// variables of at least 4096 elements, f32 states for smaller ones.
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// use candle_nn::{Optimizer, ParamsAdamW};
    /// use qlora_candle::AdamW8bit;
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// let w = Var::from_tensor(&Tensor::ones((64, 128), candle_core::DType::F32, &Device::Cpu)?)?;
    /// let mut opt = AdamW8bit::new(vec![w.clone()], ParamsAdamW { lr: 1e-2, ..Default::default() })?;
    /// for _ in 0..3 {
    ///     let loss = w.as_tensor().sqr()?.sum_all()?;
    ///     opt.backward_step(&loss)?;
    /// }
    /// assert!(w.as_tensor().mean_all()?.to_scalar::<f32>()? < 1.0);
    /// assert_eq!(opt.state().inner().state_bytes(), 2 * 8192 + 8 * 8192 / 256);
    /// # Ok(())
    /// # }
    /// ```
    AdamW8bit,
    HostStorage,
    AdamConfig::adamw8bit(),
    host_storage,
    Paging::No
);

adam_optimizer!(
    /// `bnb.optim.AdamW32bit`: f32 states (8 bytes per parameter).
    AdamW32bit,
    HostStorage,
    AdamConfig::adamw32bit(),
    host_storage,
    Paging::No
);

adam_optimizer!(
    /// `bnb.optim.PagedAdamW8bit`: [`AdamW8bit`] whose states of variables with at least 10⁵
    /// elements live in a `qlora-paged-alloc` pool: host memory for CPU variables, CUDA
    /// managed memory for variables on a CUDA device (feature `cuda`); see
    /// [`PAGED_POOL_BUDGET`].
    PagedAdamW8bit,
    PagedStorage,
    AdamConfig::adamw8bit(),
    paged_storage,
    Paging::NewPool
);

adam_optimizer!(
    /// `bnb.optim.PagedAdamW32bit`: [`AdamW32bit`] with paged states.
    PagedAdamW32bit,
    PagedStorage,
    AdamConfig::adamw32bit(),
    paged_storage,
    Paging::NewPool
);

impl PagedAdamW8bit {
    /// A paged 8-bit AdamW whose states live in `pool` (its budget caps them). For variables
    /// on a CUDA device the pool must be a CUDA pool of that device (`PoolConfig::cuda`).
    pub fn with_pool(vars: Vec<Var>, params: ParamsAdamW, pool: Pool) -> Result<Self> {
        Ok(PagedAdamW8bit(AdamVars::new(
            vars,
            config(AdamConfig::adamw8bit(), &params),
            PagedStorage::new(pool.clone()),
            Paging::Pool(pool),
        )?))
    }
}
