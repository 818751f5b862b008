//! Atomic file and folder outputs that leave nothing behind.
//!
//! # Should I use this crate?
//!
//! Use it when a program writes files that must never be seen half-written (model weights,
//! training checkpoints, optimizer states) and must not leak hidden temporaries when it fails,
//! is stopped, or is killed. `qlora-checkpoint`, `qlora-lora`, `qlora-optim` and the `qlora`
//! command write every output through it. It has no other qlora dependency.
//!
//! # What it guarantees
//!
//! An output `DIR/NAME` is built as `DIR/.NAME.tmp-PID` ([`temp_path`]) and renamed over
//! `DIR/NAME` when complete ([`TempOutput::commit`]), so a reader sees the old output or the new
//! one, never a part. The temporary is removed:
//!
//! | when | by |
//! |---|---|
//! | a write fails (full disk `ENOSPC`, `EACCES`, read-only folder `EROFS`, file-size limit `EFBIG`) | the [`TempOutput`] guard, dropped on the error path; the error names the output |
//! | the writer returns early or panics | the guard's `Drop` |
//! | SIGINT, SIGTERM, SIGHUP | [`install_signal_cleanup`] (one call in `main`): removes all temporaries in flight, prints one line, exits 130/143/129 |
//! | SIGKILL, a power cut | the next [`TempOutput`] for the same output, which removes temporaries of processes that no longer exist ([`remove_leftovers`]; [`report_leftovers_with`] to tell the user) |
//!
//! An existing output is never touched until the rename: on any failure it stays as it was.
//!
//! # Example: one file
//!
//! ```
//! let dir = tempfile::tempdir()?;
//! let out = dir.path().join("optimizer.safetensors");
//! qlora_atomic_write::write_atomically(&out, b"state bytes")?;
//! assert_eq!(std::fs::read(&out)?, b"state bytes");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Example: a training checkpoint folder
//!
//! A checkpoint (the PEFT adapter folder and the optimizer state together) is written into a
//! temporary folder and renamed into place as a whole, so `--resume` only ever finds complete
//! checkpoints. A run stopped while saving leaves no `checkpoint-*` folder at all; its hidden
//! `.checkpoint-N.tmp-PID` is removed on the signal, or by the next save of that checkpoint when
//! the run was killed outright.
//!
//! ```
//! use qlora_atomic_write::TempOutput;
//! use std::path::{Path, PathBuf};
//!
//! fn save_checkpoint(run: &Path, step: u64) -> qlora_atomic_write::Result<PathBuf> {
//!     let dir = run.join(format!("checkpoint-{step}"));
//!     let tmp = TempOutput::folder(&dir)?;
//!     let io = |e| qlora_atomic_write::Error::new(&dir, e);
//!     // In a training loop: `adapter.save(&tmp.path().join("adapter"))` (qlora-lora's
//!     // PeftAdapter) and `optimizer.save_state(tmp.path().join("optimizer.safetensors"))`
//!     // (qlora-optim's Adam).
//!     std::fs::create_dir(tmp.path().join("adapter")).map_err(io)?;
//!     std::fs::write(tmp.path().join("adapter/adapter_model.safetensors"), b"...").map_err(io)?;
//!     std::fs::write(tmp.path().join("optimizer.safetensors"), b"...").map_err(io)?;
//!     std::fs::write(tmp.path().join("trainer_state.json"), format!("{{\"step\": {step}}}")).map_err(io)?;
//!     tmp.commit()?; // all or nothing; an existing checkpoint-{step} is replaced as a whole
//!     Ok(dir)
//! }
//!
//! /// The newest complete checkpoint: hidden temporaries never match `checkpoint-N`.
//! fn latest_checkpoint(run: &Path) -> std::io::Result<Option<PathBuf>> {
//!     let mut best: Option<(u64, PathBuf)> = None;
//!     for entry in std::fs::read_dir(run)? {
//!         let entry = entry?;
//!         let name = entry.file_name().to_string_lossy().into_owned();
//!         if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse().ok()) {
//!             if best.as_ref().is_none_or(|(b, _)| step > *b) {
//!                 best = Some((step, entry.path()));
//!             }
//!         }
//!     }
//!     Ok(best.map(|(_, p)| p))
//! }
//!
//! let run = tempfile::tempdir()?;
//! save_checkpoint(run.path(), 100)?;
//! // A save interrupted at step 200: the guard is dropped before the commit.
//! let tmp = TempOutput::folder(run.path().join("checkpoint-200"))?;
//! std::fs::write(tmp.path().join("optimizer.safetensors"), b"half")?;
//! drop(tmp);
//! assert_eq!(latest_checkpoint(run.path())?, Some(run.path().join("checkpoint-100")));
//! assert_eq!(std::fs::read_dir(run.path())?.count(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # In a command line program
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     // Stopped by Ctrl-C or a scheduler's SIGTERM: temporaries removed, exit 130 / 143.
//!     if let Err(e) = qlora_atomic_write::install_signal_cleanup() {
//!         eprintln!("error: cannot install signal handlers: {e}");
//!         return std::process::ExitCode::FAILURE;
//!     }
//!     qlora_atomic_write::report_leftovers_with(|removed| {
//!         for l in removed {
//!             eprintln!("removed {} left by stopped run {}", l.path.display(), l.pid);
//!         }
//!     });
//!     // ... write outputs through TempOutput / write_atomically ...
//!     std::process::ExitCode::SUCCESS
//! }
//! ```
//!
//! Unix only (process ids, signals, `rename(2)` semantics).
#![deny(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod signals;
mod temp;

pub use signals::install_signal_cleanup;
pub use temp::{
    remove_leftovers, report_leftovers_with, temp_path, write_atomically, write_atomically_with,
    Leftover, TempOutput, TEMP_MARKER,
};

use std::path::{Path, PathBuf};

/// Writing an output failed. Names the output (not the hidden temporary), with the OS error:
/// e.g. `out/model.safetensors: No space left on device (os error 28)`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct Error {
    /// The output (or, for [`remove_leftovers`], the folder searched).
    pub path: PathBuf,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

impl Error {
    /// An error about `path`.
    pub fn new(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
