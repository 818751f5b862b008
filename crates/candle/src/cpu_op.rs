//! Shared pieces of the crate's fused CPU custom ops (the LoRA layer, the Llama attention,
//! softmax, RMSNorm and loss): slices of contiguous storage, and of a tensor inside a backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// The elements of a contiguous `layout` in `data`; an error naming `what` for a strided one.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: the input is not contiguous"),
    }
}

/// The f32 elements of a contiguous CPU storage; an error naming `what` for another dtype.
pub(crate) fn f32s<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(data) => contiguous(data, layout, what),
        other => candle_core::bail!("{what}: expected f32, found {:?}", other.dtype()),
    }
}

/// Run `f` on the f32 elements of a CPU tensor (made contiguous first if it is strided).
pub(crate) fn with_f32s<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(f32s(cpu, layout, what)?),
        _ => candle_core::bail!("{what}: expected a CPU tensor"),
    }
}
