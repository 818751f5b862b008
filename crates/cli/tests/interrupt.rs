//! Fault injection on the `qlora` binary: stopped by SIGTERM, SIGINT or SIGHUP part-way through
//! a write, killed by SIGKILL, or writing past a file-size limit or into a folder it may not
//! write, it leaves no temporary behind, exits with the conventional status and a one-line
//! message, and an existing output stays as it was.

use half::bf16;
use qlora_checkpoint::{write_safetensors_atomic, TensorData};
use rustix::process::{kill_process, Pid, Signal};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PREVIOUS: &[u8] = b"an earlier output that must survive";

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A bf16 model of `layers` 1024 × 4096 linear weights (8 MiB each) in `dir/in.safetensors`.
fn big_input(dir: &Path, layers: usize) -> PathBuf {
    let path = dir.join("in.safetensors");
    let rows = 1024;
    let cols = 4096;
    let w: Vec<bf16> = (0..rows * cols)
        .map(|i| bf16::from_f32(((i % 9973) as f32 * 0.37).sin()))
        .collect();
    let tensors = (0..layers)
        .map(|l| {
            (
                format!("model.layers.{l}.mlp.down_proj.weight"),
                TensorData::from_elements(&w, vec![rows, cols]),
            )
        })
        .collect();
    write_safetensors_atomic(&path, tensors, None).unwrap();
    path
}

fn quantize(input: &Path, output: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qlora"));
    c.args(["quantize", "--double-quant"])
        .arg(input)
        .arg(output)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Wait until `path` exists (true) or the child has exited (false).
fn wait_for(child: &mut Child, path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return path.exists();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("{} did not appear within 60 s", path.display());
}

fn temp_of(output: &Path, child: &Child) -> PathBuf {
    qlora_checkpoint::atomic::temp_path(output, child.id())
}

fn stderr_of(child: Child) -> (std::process::ExitStatus, String) {
    let Output { status, stderr, .. } = child.wait_with_output().unwrap();
    (status, String::from_utf8_lossy(&stderr).into_owned())
}

/// Run `quantize` and send `signal` once its temporary output exists. An input small enough to
/// be finished before the signal lands is doubled and the run repeated, so the test never
/// depends on the machine's speed. Returns the exit status and standard error.
fn interrupted(dir: &Path, signal: Signal) -> (std::process::ExitStatus, String) {
    let output = dir.join("out.safetensors");
    let mut layers = 4;
    loop {
        let input = big_input(dir, layers);
        std::fs::write(&output, PREVIOUS).unwrap();
        let mut child = quantize(&input, &output).spawn().unwrap();
        let temp = temp_of(&output, &child);
        if wait_for(&mut child, &temp) {
            let _ = kill_process(Pid::from_child(&child), signal);
            let (status, err) = stderr_of(child);
            eprintln!("{signal:?} sent while writing the output of {layers} layers: {status:?}");
            if status.success() && layers < 256 {
                layers *= 2; // finished before the signal landed
                continue;
            }
            return (status, err);
        }
        let (status, err) = stderr_of(child);
        assert!(status.success(), "quantize failed: {err}");
        assert!(
            layers < 256,
            "quantize never ran long enough to be interrupted"
        );
        layers *= 2;
    }
}

#[test]
fn signals_mid_write_leave_nothing_and_exit_with_the_shells_status() {
    for (signal, name, code) in [
        (Signal::TERM, "SIGTERM", 143),
        (Signal::INT, "SIGINT", 130),
        (Signal::HUP, "SIGHUP", 129),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let (status, err) = interrupted(tmp.path(), signal);
        assert_eq!(
            status.code(),
            Some(code),
            "{name}: {status:?}, stderr: {err}"
        );
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("qlora: ")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        let expected = format!("qlora: stopped by {name}; removed the unfinished output ");
        assert!(
            lines[0].starts_with(&expected) && lines[0].contains(".out.safetensors.tmp-"),
            "{err}"
        );
        assert_eq!(
            listing(tmp.path()),
            ["in.safetensors", "out.safetensors"],
            "{name}"
        );
        assert_eq!(
            std::fs::read(tmp.path().join("out.safetensors")).unwrap(),
            PREVIOUS
        );
    }
}

#[test]
fn leftovers_of_a_killed_run_are_removed_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (status, _) = interrupted(tmp.path(), Signal::KILL);
    assert_eq!(status.signal(), Some(9));
    let left: Vec<String> = listing(tmp.path())
        .into_iter()
        .filter(|n| n.starts_with(".out.safetensors.tmp-"))
        .collect();
    assert_eq!(left.len(), 1, "SIGKILL leaves its temporary");
    let out = tmp.path().join("out.safetensors");
    let run = quantize(&tmp.path().join("in.safetensors"), &out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(
        err.contains("qlora: removed the temporary output of an interrupted earlier run")
            && err.contains(&left[0]),
        "{err}"
    );
    assert_eq!(listing(tmp.path()), ["in.safetensors", "out.safetensors"]);
    assert_ne!(std::fs::read(&out).unwrap(), PREVIOUS);
}

#[test]
fn file_size_limit_fails_cleanly_and_keeps_the_existing_output() {
    let tmp = tempfile::tempdir().unwrap();
    let input = big_input(tmp.path(), 4); // ~9 MB of NF4 output
    let out = tmp.path().join("out.safetensors");
    std::fs::write(&out, PREVIOUS).unwrap();
    let mut cmd = quantize(&input, &out);
    // SAFETY: between fork and exec the closure only calls setrlimit, a single system call that
    // neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(|| {
            let limit = rustix::process::Rlimit {
                current: Some(1 << 20),
                maximum: Some(1 << 20),
            };
            rustix::process::setrlimit(rustix::process::Resource::Fsize, limit)
                .map_err(std::io::Error::from)
        });
    }
    let run = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{:?}: {err}", run.status);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with(&format!("error: {}: ", out.display()))
            && lines[0].contains("File too large"),
        "{err}"
    );
    assert_eq!(listing(tmp.path()), ["in.safetensors", "out.safetensors"]);
    assert_eq!(std::fs::read(&out).unwrap(), PREVIOUS);
}

#[test]
fn unwritable_output_folder_fails_cleanly() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let input = big_input(tmp.path(), 1);
    std::fs::set_permissions(&input, std::fs::Permissions::from_mode(0o644)).unwrap();
    let locked = tmp.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    let out = locked.join("out.safetensors");
    std::fs::write(&out, PREVIOUS).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    let mut cmd = quantize(&input, &out);
    if rustix::process::geteuid().is_root() {
        // Root writes anywhere: run as an ordinary user for whom the folder is read-only.
        cmd.uid(65534).gid(65534);
    }
    let run = cmd.output().unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{:?}: {err}", run.status);
    assert_eq!(
        err.trim_end(),
        format!("error: {}: Permission denied (os error 13)", out.display())
    );
    assert_eq!(listing(&locked), ["out.safetensors"]);
    assert_eq!(std::fs::read(&out).unwrap(), PREVIOUS);
}
