//! The kernels' safe task loops ([`task_8bit`], [`task_32bit`]) compiled a second and third time
//! for AVX2 and AVX-512, chosen at run time.
//!
//! Nothing here is hand-written SIMD: each copy is the same safe Rust, inlined into a function
//! with `#[target_feature]`, so the compiler vectorizes the same loops with wider registers. The
//! operations and their order are the source's; Rust never contracts a multiply and an add into
//! an FMA, and division and square root stay IEEE, so every copy gives the same bits (the tests
//! run each available implementation against the same references). The only `unsafe` is the call
//! of a `#[target_feature]` function, made after the feature was detected on this CPU.
//!
//! The 8-bit task hands its per-block update to `qlora-double-quant`'s `update_blockwise` as a
//! closure. The closure is written inside each `#[target_feature]` function, because a closure
//! is compiled with the features of the function it is written in, inlined or not (written in the
//! feature-less `task_8bit` it ran at SSE2 width, 2.5× slower).

use crate::element::Element;
use crate::kernel::{block_update, task_32bit, task_8bit, Consts, Task32, Task8};
use qlora_double_quant::Implementation;

/// A hint that the `len` elements from `start` will be read soon: one prefetch per 64-byte line
/// (nothing on targets without a prefetch instruction). Never reads or faults, so `start` may be
/// any address.
#[inline(always)]
pub(crate) fn prefetch<T>(start: *const T, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = len * core::mem::size_of::<T>();
        let p = start.cast::<i8>();
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    p.wrapping_add(off),
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, len);
}

/// One task of the 8-bit update with `imp` (the baseline copy when `imp` is not available).
#[inline]
pub(crate) fn run_8bit<P: Element, G: Element>(
    imp: Implementation,
    t: Task8<'_, P, G>,
    k: &Consts,
) {
    match imp {
        #[cfg(target_arch = "x86_64")]
        Implementation::Avx512 if imp.is_available() => {
            // SAFETY: `Implementation::Avx512` is available only on a CPU with AVX-512 F, BW, DQ
            // and VL, every feature `task_8bit_avx512` is compiled for (match guard).
            unsafe { x86_64::task_8bit_avx512(t, k) }
        }
        #[cfg(target_arch = "x86_64")]
        Implementation::Avx2 if imp.is_available() => {
            // SAFETY: `Implementation::Avx2` is available only on a CPU with AVX2 (match guard).
            unsafe { x86_64::task_8bit_avx2(t, k) }
        }
        _ => task_8bit(t, |p, g, s1, s2, gbuf| block_update(p, g, s1, s2, gbuf, k)),
    }
}

/// One task of the 32-bit update with `imp` (the baseline copy when `imp` is not available).
#[inline]
pub(crate) fn run_32bit<P: Element, G: Element>(
    imp: Implementation,
    t: Task32<'_, P, G>,
    k: &Consts,
) {
    match imp {
        #[cfg(target_arch = "x86_64")]
        Implementation::Avx512 if imp.is_available() => {
            // SAFETY: `Implementation::Avx512` is available only on a CPU with AVX-512 F, BW, DQ
            // and VL, every feature `task_32bit_avx512` is compiled for (match guard).
            unsafe { x86_64::task_32bit_avx512(t, k) }
        }
        #[cfg(target_arch = "x86_64")]
        Implementation::Avx2 if imp.is_available() => {
            // SAFETY: `Implementation::Avx2` is available only on a CPU with AVX2 (match guard).
            unsafe { x86_64::task_32bit_avx2(t, k) }
        }
        _ => task_32bit(t, k),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use super::*;

    /// # Safety
    /// The CPU must have AVX-512 F, BW, DQ and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn task_8bit_avx512<P: Element, G: Element>(t: Task8<'_, P, G>, k: &Consts) {
        // The closure inherits this function's target features.
        task_8bit(t, |p, g, s1, s2, gbuf| block_update(p, g, s1, s2, gbuf, k))
    }

    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn task_8bit_avx2<P: Element, G: Element>(t: Task8<'_, P, G>, k: &Consts) {
        // The closure inherits this function's target features.
        task_8bit(t, |p, g, s1, s2, gbuf| block_update(p, g, s1, s2, gbuf, k))
    }

    /// # Safety
    /// The CPU must have AVX-512 F, BW, DQ and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
    pub(super) unsafe fn task_32bit_avx512<P: Element, G: Element>(
        t: Task32<'_, P, G>,
        k: &Consts,
    ) {
        task_32bit(t, k)
    }

    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn task_32bit_avx2<P: Element, G: Element>(t: Task32<'_, P, G>, k: &Consts) {
        task_32bit(t, k)
    }
}
