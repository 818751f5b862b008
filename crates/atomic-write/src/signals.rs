//! The opt-in clean-up on SIGINT, SIGTERM and SIGHUP: remove every temporary in flight, say so
//! in one line, exit with the shell's status for the signal.

use crate::temp::{in_flight, remove_path};
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM, SIGXFSZ};
use signal_hook::iterator::Signals;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

/// The signals that stop the process after the clean-up.
const STOPPING: [(i32, &str); 3] = [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM"), (SIGHUP, "SIGHUP")];

/// Install the clean-up once per process: on SIGINT, SIGTERM or SIGHUP a background thread
/// removes every [`TempOutput`](crate::TempOutput) not yet committed (and the outputs of
/// [`write_atomically`](crate::write_atomically)), prints one line on standard error
/// (`PROGRAM: stopped by SIGTERM; removed the unfinished output PATH`) and exits with status
/// 128 + the signal number (130, 143, 129), as a shell reports a process stopped by it. A
/// commit under way finishes first, so an output is either complete or absent.
///
/// SIGXFSZ (a write past the file-size limit, `ulimit -f`) is ignored from then on, so that
/// such a write fails with `EFBIG`, an error the writer reports and cleans up after, instead of
/// killing the process with a core dump.
///
/// Call it early in `main` of a program that writes outputs; a library should leave the choice
/// to the program. Calling it again does nothing.
///
/// ```
/// qlora_atomic_write::install_signal_cleanup()?;
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// When the handlers cannot be registered or the thread cannot be started.
pub fn install_signal_cleanup() -> io::Result<()> {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    let mut signals = Signals::new(STOPPING.iter().map(|(s, _)| *s).chain([SIGXFSZ]))?;
    std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal != SIGXFSZ {
                    stop(signal);
                }
            }
        })?;
    *installed = true;
    Ok(())
}

/// Remove everything in flight and exit. Holding the registry lock until the exit keeps any
/// other thread from creating or committing a temporary meanwhile.
fn stop(signal: i32) -> ! {
    let mut registry = in_flight();
    let mut removed = Vec::new();
    for path in registry.drain(..) {
        let existed = std::fs::symlink_metadata(&path).is_ok();
        if remove_path(&path).is_ok() && existed {
            removed.push(path);
        }
    }
    eprintln!("{}", stop_message(signal, &removed));
    std::process::exit(128 + signal)
}

fn stop_message(signal: i32, removed: &[PathBuf]) -> String {
    let program = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "process".into());
    let name = STOPPING
        .iter()
        .find(|(s, _)| *s == signal)
        .map_or("a signal", |(_, n)| n);
    let paths = removed
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match removed.len() {
        0 => format!("{program}: stopped by {name}"),
        1 => format!("{program}: stopped by {name}; removed the unfinished output {paths}"),
        n => format!("{program}: stopped by {name}; removed {n} unfinished outputs: {paths}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_one_line_naming_signal_and_paths() {
        let m = stop_message(SIGTERM, &[PathBuf::from("/d/.q.safetensors.tmp-7")]);
        assert!(
            m.ends_with(
                ": stopped by SIGTERM; removed the unfinished output /d/.q.safetensors.tmp-7"
            ),
            "{m}"
        );
        let m = stop_message(SIGINT, &[PathBuf::from("a"), PathBuf::from("b")]);
        assert!(
            m.ends_with("stopped by SIGINT; removed 2 unfinished outputs: a, b"),
            "{m}"
        );
        assert!(stop_message(SIGHUP, &[]).ends_with("stopped by SIGHUP"));
        assert!(!m.contains('\n'));
    }
}
