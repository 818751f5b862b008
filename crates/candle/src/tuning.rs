//! Process settings for CPU training, for a program's `main` to apply at start-up before any
//! thread exists (`qlora demo`, `qlora finetune` and the `qlora_train_bench` example do).
//!
//! * candle's CPU element-wise ops run on a barrier pool whose caller spins until every worker
//!   has finished; on a machine with few cores, or one shared with other work, a descheduled
//!   worker makes that spin eat whole time slices (measured on the 2-core development VM under
//!   load: 2,400 vs 500 tokens/s for the calibration QLoRA step, docs/demo.md). Unless the user
//!   set `CANDLE_NUM_THREADS`, element-wise ops run on the calling thread; matrix products
//!   (candle's and ours) still use every core through rayon (`RAYON_NUM_THREADS`).
//! * glibc returns freed memory above `M_TRIM_THRESHOLD` to the kernel and serves allocations
//!   above `M_MMAP_THRESHOLD` with fresh mappings, so each training step page-faults its
//!   activations in again (a quarter of a step's time in the profile). Training keeps its heap
//!   (glibc only; elsewhere this part does nothing).
//!
//! ```
//! // First thing in `main`, while the process has one thread:
//! qlora_candle::tuning::for_cpu_training();
//! assert!(std::env::var_os("CANDLE_NUM_THREADS").is_some());
//! // ... build the model and train
//! ```

/// Applies the settings above. Call it first thing in `main`, while the process has one thread:
/// it sets an environment variable, which must not race with another thread reading the
/// environment.
pub fn for_cpu_training() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // The process is single-threaded here (called before anything spawns a thread), so
        // nothing reads the environment concurrently.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    keep_heap();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_heap() {
    // 1 GiB: allocations up to that size come from the heap, and the heap is trimmed only
    // when more than that is free at its top.
    const LIMIT: libc::c_int = 1 << 30;
    // SAFETY: `mallopt` only sets glibc allocator parameters; the arguments are valid
    // parameter numbers with in-range values, and no allocation is in flight on another
    // thread (the process is single-threaded here). A rejected value leaves the default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT);
        libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_heap() {}
