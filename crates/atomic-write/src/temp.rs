//! Temporary outputs: their names, the process-wide registry of those in flight, the guard that
//! commits or removes one, and the removal of leftovers of runs that died.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};

/// What sits between an output's name and the writing process's id in a temporary's name.
pub const TEMP_MARKER: &str = ".tmp-";

/// Absolute paths of this process's temporaries that are neither committed nor removed yet.
/// Creating, committing and removing one, and the signal clean-up, all hold this lock, so a
/// signal never races a rename.
static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// What [`report_leftovers_with`] installs.
type Report = fn(&[Leftover]);

/// Called with the leftovers removed by [`TempOutput::file`] / [`TempOutput::folder`].
static REPORT: RwLock<Option<Report>> = RwLock::new(None);

pub(crate) fn in_flight() -> MutexGuard<'static, Vec<PathBuf>> {
    // A panic elsewhere while holding the lock leaves the list valid: keep using it.
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

/// The temporary name that process `pid` uses while writing `output`: `.NAME.tmp-PID` in the
/// same folder (so the final rename never crosses file systems).
///
/// ```
/// use std::path::Path;
/// let t = qlora_atomic_write::temp_path(Path::new("out/model.safetensors"), 4242);
/// assert_eq!(t, Path::new("out/.model.safetensors.tmp-4242"));
/// ```
pub fn temp_path(output: &Path, pid: u32) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    output.with_file_name(format!(".{name}{TEMP_MARKER}{pid}"))
}

/// A temporary output of a run that no longer exists, found and removed next to its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// Where it was.
    pub path: PathBuf,
    /// The id of the process that wrote it.
    pub pid: u32,
    /// Bytes it held (files in a folder added up).
    pub bytes: u64,
}

/// Have `report` called with the leftovers that each later [`TempOutput::file`] or
/// [`TempOutput::folder`] removes (never with an empty list). A library prints nothing by
/// itself; a command line tool passes a function that prints one line. The last call wins.
///
/// ```
/// fn say(removed: &[qlora_atomic_write::Leftover]) {
///     for l in removed {
///         eprintln!("removed {} ({} bytes) left by killed process {}", l.path.display(), l.bytes, l.pid);
///     }
/// }
/// qlora_atomic_write::report_leftovers_with(say);
/// ```
pub fn report_leftovers_with(report: fn(&[Leftover])) {
    *REPORT.write().unwrap_or_else(|e| e.into_inner()) = Some(report);
}

fn report(removed: &[Leftover]) {
    if removed.is_empty() {
        return;
    }
    if let Some(f) = *REPORT.read().unwrap_or_else(|e| e.into_inner()) {
        f(removed);
    }
}

/// Whether a process with this id exists (one of another user counts).
fn process_exists(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

/// Remove a file, or a folder with everything in it; gone already is fine. Writers of other
/// threads may still be adding files to a folder being removed, so a failed removal is retried.
pub(crate) fn remove_path(path: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        let result = match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => Err(e),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) if tries < 50 => {
                tries += 1;
                std::thread::yield_now();
            }
            Err(e) => return Err(e),
        }
    }
}

/// Bytes under a path (not following links).
fn size_of(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| size_of(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// The absolute form of `output`, its folder and its file name, or an error naming `output`.
fn split(output: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let target = std::path::absolute(output).map_err(|e| Error::new(output, e))?;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned());
    match (target.parent(), name) {
        (Some(dir), Some(name)) if !name.is_empty() => Ok((target.clone(), dir.into(), name)),
        _ => Err(Error::new(
            output,
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a file or folder name to write to",
            ),
        )),
    }
}

/// Leftovers next to `target` (absolute): temporaries of processes that no longer exist, or of
/// this process's id but not in `registry` (a run before a pid was reused, e.g. in a container).
fn remove_leftovers_in(dir: &Path, name: &str, registry: &[PathBuf]) -> io::Result<Vec<Leftover>> {
    let prefix = format!(".{name}{TEMP_MARKER}");
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other?,
    };
    let me = std::process::id();
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<u32>().ok())
        else {
            continue;
        };
        let path = dir.join(&file_name);
        let dead = if pid == me {
            !registry.contains(&path)
        } else {
            !process_exists(pid)
        };
        if dead {
            let bytes = size_of(&path);
            if remove_path(&path).is_ok() {
                removed.push(Leftover { path, pid, bytes });
            }
        }
    }
    removed.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(removed)
}

/// Remove the temporaries that runs which no longer exist left next to `output` (a run killed
/// with SIGKILL, or by a power cut, cannot clean up after itself), and return them. Temporaries
/// of live processes are kept. [`TempOutput::file`] and [`TempOutput::folder`] call this for
/// their output; call it directly to clean up without writing.
///
/// Process ids are looked up on this machine: on a folder shared between machines, do not run
/// writers of the same output on two machines at once.
///
/// ```
/// use qlora_atomic_write::{remove_leftovers, temp_path};
/// let dir = tempfile::tempdir()?;
/// let out = dir.path().join("model.safetensors");
/// // A run that was killed (no process has id u32::MAX) left half a file.
/// std::fs::write(temp_path(&out, u32::MAX), b"half a tensor")?;
/// let removed = remove_leftovers(&out)?;
/// assert_eq!(removed.len(), 1);
/// assert_eq!((removed[0].pid, removed[0].bytes), (u32::MAX, 13));
/// assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn remove_leftovers(output: &Path) -> Result<Vec<Leftover>> {
    let (_, dir, name) = split(output)?;
    let registry = in_flight();
    let removed = remove_leftovers_in(&dir, &name, &registry).map_err(|e| Error::new(&dir, e));
    drop(registry);
    removed
}

/// A hidden temporary file or folder next to an output, renamed over the output by
/// [`commit`](Self::commit).
///
/// Until then it is removed when the guard is dropped (on an error, a `?`, a panic that
/// unwinds), and by the signal clean-up ([`install_signal_cleanup`](crate::install_signal_cleanup))
/// when the process is stopped; a run killed outright leaves it, and the next
/// `TempOutput` for the same output removes it ([`remove_leftovers`]). Its name is
/// [`temp_path`]`(output, pid)`: one writer per output per process.
///
/// ```
/// use qlora_atomic_write::TempOutput;
/// use std::io::Write;
///
/// let dir = tempfile::tempdir()?;
/// let out = dir.path().join("model.safetensors");
/// std::fs::write(&out, b"old")?;
///
/// // A failed write: the old output stays, the temporary goes.
/// let (tmp, mut file) = TempOutput::file(&out)?;
/// file.write_all(b"half")?;
/// drop((tmp, file));
/// assert_eq!(std::fs::read(&out)?, b"old");
/// assert_eq!(std::fs::read_dir(dir.path())?.count(), 1);
///
/// // A finished one replaces it in one rename.
/// let (tmp, mut file) = TempOutput::file(&out)?;
/// file.write_all(b"new")?;
/// tmp.commit()?;
/// assert_eq!(std::fs::read(&out)?, b"new");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct TempOutput {
    /// Absolute path of the temporary.
    temp: PathBuf,
    /// The output as the caller named it (for messages).
    output: PathBuf,
    /// Absolute path of the output.
    target: PathBuf,
    folder: bool,
    leftovers: Vec<Leftover>,
    /// Committed: nothing to remove.
    done: bool,
}

impl TempOutput {
    /// Create an empty temporary file for `output` (a file), opened for reading and writing.
    /// Removes leftovers of dead runs for `output` first.
    ///
    /// # Errors
    ///
    /// When the temporary cannot be created (the folder is missing, not writable, read-only,
    /// or this process already writes `output`); the error names `output`.
    pub fn file(output: impl AsRef<Path>) -> Result<(Self, File)> {
        Self::create(output.as_ref(), false, |temp| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(temp)
        })
    }

    /// Create an empty temporary folder for `output` (a folder); fill it through
    /// [`path`](Self::path). Removes leftovers of dead runs for `output` first.
    ///
    /// # Errors
    ///
    /// As [`file`](Self::file).
    pub fn folder(output: impl AsRef<Path>) -> Result<Self> {
        Self::create(output.as_ref(), true, |p| std::fs::create_dir(p)).map(|(guard, ())| guard)
    }

    fn create<T>(
        output: &Path,
        folder: bool,
        make: impl FnOnce(&Path) -> io::Result<T>,
    ) -> Result<(Self, T)> {
        let (target, dir, name) = split(output)?;
        let temp = temp_path(&target, std::process::id());
        let mut registry = in_flight();
        // Best effort: a folder that cannot be listed fails the creation below with a clearer error.
        let leftovers = remove_leftovers_in(&dir, &name, &registry).unwrap_or_default();
        let made = make(&temp).map_err(|e| {
            let e = if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    e.kind(),
                    format!("already being written by this process ({})", temp.display()),
                )
            } else {
                e
            };
            Error::new(output, e)
        })?;
        registry.push(temp.clone());
        drop(registry);
        report(&leftovers);
        let guard = TempOutput {
            temp,
            output: output.to_path_buf(),
            target,
            folder,
            leftovers,
            done: false,
        };
        Ok((guard, made))
    }

    /// The temporary file or folder to write.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// The output, as it was named when the guard was created.
    pub fn output(&self) -> &Path {
        &self.output
    }

    /// Leftovers of dead runs that were removed when this temporary was created.
    pub fn leftovers(&self) -> &[Leftover] {
        &self.leftovers
    }

    /// Where `path`, a path inside the temporary, will be once committed: for error messages
    /// that should name what the user asked for, not the hidden temporary. Other paths are
    /// returned unchanged.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let out = dir.path().join("model");
    /// let tmp = qlora_atomic_write::TempOutput::folder(&out)?;
    /// let shard = tmp.path().join("model-00001-of-00002.safetensors");
    /// assert_eq!(tmp.final_path(&shard), out.join("model-00001-of-00002.safetensors"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn final_path(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.temp) {
            Ok(rest) if rest.as_os_str().is_empty() => self.output.clone(),
            Ok(rest) => self.output.join(rest),
            Err(_) => path.to_path_buf(),
        }
    }

    /// Flush the temporary to disk and rename it over the output. A file replaces an existing
    /// file in one rename. A folder takes the place of a missing output or an empty folder; an
    /// existing output is swapped with it in one step (Linux `renameat2(RENAME_EXCHANGE)`; on
    /// other systems an existing non-empty output is an error) and then removed.
    ///
    /// # Errors
    ///
    /// When syncing or renaming fails; the temporary is removed and an existing output is
    /// left as it was. The error names the output.
    pub fn commit(mut self) -> Result<()> {
        sync_tree(&self.temp).map_err(|e| Error::new(&self.output, e))?;
        let mut registry = in_flight();
        let swapped = match std::fs::rename(&self.temp, &self.target) {
            Ok(()) => false,
            Err(e) if self.folder && e.kind() != io::ErrorKind::NotFound => {
                exchange(&self.temp, &self.target).map_err(|_| Error::new(&self.output, e))?;
                true
            }
            Err(e) => return Err(Error::new(&self.output, e)),
        };
        if !swapped {
            registry.retain(|p| p != &self.temp);
            self.done = true;
        }
        drop(registry);
        if let Some(dir) = self.target.parent() {
            // Makes the rename itself durable; not every file system can sync a folder.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        // After a swap the temporary holds the old output: dropping the guard removes it.
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = remove_path(&self.temp);
        in_flight().retain(|p| p != &self.temp);
    }
}

/// fsync a file, or every file and folder under a folder.
fn sync_tree(path: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if !entry.file_type()?.is_symlink() {
                sync_tree(&entry.path())?;
            }
        }
    }
    File::open(path)?.sync_all()
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(io::Error::from)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn exchange(_: &Path, b: &Path) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} exists; remove it first", b.display()),
    ))
}

/// Write `bytes` to `output` atomically: a temporary file next to it, synced, renamed over it.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let out = dir.path().join("adapter_config.json");
/// qlora_atomic_write::write_atomically(&out, b"{}\n")?;
/// assert_eq!(std::fs::read(&out)?, b"{}\n");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// When creating, writing or renaming fails (a full disk, no permission, a read-only folder, a
/// file-size limit): the error names `output`, the temporary is removed and an existing
/// output is left untouched.
pub fn write_atomically(output: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically_with(output, |file| io::Write::write_all(file, bytes))
}

/// Like [`write_atomically`], with `write` producing the contents into the temporary file.
///
/// ```
/// use std::io::{self, Write};
/// let dir = tempfile::tempdir()?;
/// let out = dir.path().join("log.txt");
/// std::fs::write(&out, "kept")?;
/// let err = qlora_atomic_write::write_atomically_with(&out, |f| {
///     f.write_all(b"partial")?;
///     Err(io::Error::from_raw_os_error(28)) // ENOSPC
/// })
/// .unwrap_err();
/// assert!(err.to_string().contains("log.txt"));
/// assert_eq!(std::fs::read_to_string(&out)?, "kept");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// As [`write_atomically`], and whatever `write` returns (named after `output`).
pub fn write_atomically_with(
    output: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<()> {
    let (temp, mut file) = TempOutput::file(output)?;
    write(&mut file).map_err(|e| Error::new(output, e))?;
    drop(file);
    temp.commit()
}
