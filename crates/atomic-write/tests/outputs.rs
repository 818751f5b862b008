//! Temporary outputs: failures leave nothing and keep an existing output, folders are renamed
//! as a whole, leftovers of dead processes are removed and those of live ones kept.

use qlora_atomic_write::{
    remove_leftovers, temp_path, write_atomically, write_atomically_with, TempOutput,
};
use std::io::{self, Write};
use std::path::Path;

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A process id that no process has: a child that has exited and been waited for.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn failed_write_keeps_the_existing_output_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.safetensors");
    std::fs::write(&out, b"the old model").unwrap();
    for errno in [28, 27, 13, 30] {
        // ENOSPC, EFBIG, EACCES, EROFS as a writer meets them part-way.
        let err = write_atomically_with(&out, |f| {
            f.write_all(&[7; 100_000])?;
            Err(io::Error::from_raw_os_error(errno))
        })
        .unwrap_err();
        assert_eq!(err.path, out);
        assert_eq!(err.source.raw_os_error(), Some(errno));
        let text = err.to_string();
        assert!(text.starts_with(&format!("{}: ", out.display())), "{text}");
        assert_eq!(std::fs::read(&out).unwrap(), b"the old model");
        assert_eq!(listing(dir.path()), ["model.safetensors"]);
    }
}

#[test]
fn unwritable_destination_is_an_error_naming_the_output() {
    let dir = tempfile::tempdir().unwrap();
    // A missing folder, and a "folder" that is a file: whoever runs the test (root included)
    // cannot create anything there.
    let missing = dir.path().join("no/such/folder/out.safetensors");
    let err = write_atomically(&missing, b"x").unwrap_err();
    assert_eq!(err.path, missing);
    assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
    std::fs::write(dir.path().join("file"), b"").unwrap();
    let under_file = dir.path().join("file/out.safetensors");
    let err = TempOutput::folder(&under_file).unwrap_err();
    assert_eq!(err.path, under_file);
    assert!(err.to_string().contains("out.safetensors"), "{err}");
    assert_eq!(listing(dir.path()), ["file"]);
}

#[test]
fn read_only_folder_fails_cleanly_when_permissions_apply() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let out = ro.join("out.bin");
    std::fs::write(&out, b"old").unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root ignores permission bits; the CLI tests cover that case with another user.
    let probe = ro.join(".probe");
    let enforced = std::fs::write(&probe, b"").is_err();
    let _ = std::fs::remove_file(&probe);
    if enforced {
        let err = write_atomically(&out, b"new").unwrap_err();
        assert_eq!(err.path, out);
        assert_eq!(err.source.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        assert_eq!(listing(&ro), ["out.bin"]);
    } else {
        write_atomically(&out, b"new").unwrap();
        assert_eq!(listing(&ro), ["out.bin"]);
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn dropped_guard_removes_file_and_folder_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let (tmp, mut f) = TempOutput::file(dir.path().join("a")).unwrap();
    f.write_all(b"partial").unwrap();
    assert_eq!(
        listing(dir.path()),
        [format!(".a.tmp-{}", std::process::id())]
    );
    drop(tmp);
    let tmp = TempOutput::folder(dir.path().join("b")).unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    std::fs::write(tmp.path().join("sub/x"), b"x").unwrap();
    drop(tmp);
    assert!(listing(dir.path()).is_empty());
}

#[test]
fn second_writer_of_the_same_output_in_one_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a");
    let first = TempOutput::file(&out).unwrap();
    let err = TempOutput::file(&out).unwrap_err();
    assert!(err.to_string().contains("already being written"), "{err}");
    // The refusal did not remove the first writer's temporary.
    assert!(first.0.path().exists());
}

#[test]
fn folder_output_appears_whole_and_replaces_an_existing_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("checkpoint");
    let tmp = TempOutput::folder(&out).unwrap();
    std::fs::write(tmp.path().join("adapter_model.safetensors"), b"A1").unwrap();
    assert!(!out.exists());
    tmp.commit().unwrap();
    assert_eq!(listing(&out), ["adapter_model.safetensors"]);

    let tmp = TempOutput::folder(&out).unwrap();
    std::fs::write(tmp.path().join("optimizer.safetensors"), b"O2").unwrap();
    std::fs::write(tmp.path().join("adapter_model.safetensors"), b"A2").unwrap();
    if cfg!(target_os = "linux") {
        tmp.commit().unwrap();
        assert_eq!(
            listing(&out),
            ["adapter_model.safetensors", "optimizer.safetensors"]
        );
        assert_eq!(
            std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
            b"A2"
        );
    } else {
        assert!(tmp.commit().is_err());
        assert_eq!(listing(&out), ["adapter_model.safetensors"]);
    }
    assert_eq!(listing(dir.path()), ["checkpoint"]);
}

#[test]
fn failed_folder_commit_keeps_the_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    // The output's folder disappears before the commit: the rename fails.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let out = sub.join("model");
    let tmp = TempOutput::folder(&out).unwrap();
    std::fs::write(tmp.path().join("x"), b"x").unwrap();
    let moved = dir.path().join("moved");
    std::fs::rename(&sub, &moved).unwrap();
    let err = tmp.commit().unwrap_err();
    assert_eq!(err.path, out);
    assert_eq!(
        listing(&moved),
        [format!(".model.tmp-{}", std::process::id())]
    );
    // The guard was consumed by the failed commit and its temporary is gone from where it was
    // created (the folder was moved under it, so it is still in `moved`): remove explicitly.
    std::fs::remove_dir_all(moved.join(format!(".model.tmp-{}", std::process::id()))).unwrap();
}

#[test]
fn leftovers_of_dead_processes_are_removed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q.safetensors");
    let dead = dead_pid();
    std::fs::write(temp_path(&out, dead), vec![0u8; 1000]).unwrap();
    std::fs::create_dir(temp_path(&out, u32::MAX)).unwrap();
    std::fs::write(temp_path(&out, u32::MAX).join("shard"), vec![0u8; 24]).unwrap();
    // A live process's temporary (this test's parent, pid 1 or the harness) stays; so do other
    // outputs' temporaries and names that only look similar.
    let live = std::os::unix::process::parent_id();
    std::fs::write(temp_path(&out, live), b"in flight").unwrap();
    std::fs::write(temp_path(&dir.path().join("other"), dead), b"").unwrap();
    std::fs::write(dir.path().join(".q.safetensors.tmp-12x"), b"").unwrap();

    let (tmp, mut f) = TempOutput::file(&out).unwrap();
    let mut removed: Vec<(u32, u64)> = tmp.leftovers().iter().map(|l| (l.pid, l.bytes)).collect();
    removed.sort();
    let mut expected = vec![(dead, 1000), (u32::MAX, 24)];
    expected.sort();
    assert_eq!(removed, expected);
    f.write_all(b"new").unwrap();
    tmp.commit().unwrap();
    let mut expected = vec![
        ".other.tmp-".to_string() + &dead.to_string(),
        ".q.safetensors.tmp-12x".to_string(),
        format!(".q.safetensors.tmp-{live}"),
        "q.safetensors".to_string(),
    ];
    expected.sort();
    assert_eq!(listing(dir.path()), expected);
    assert!(remove_leftovers(&out).unwrap().is_empty());
}

#[test]
fn own_pid_leftover_not_in_flight_is_stale() {
    // A container restarts and the new run gets the old run's pid.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    std::fs::write(temp_path(&out, std::process::id()), b"old run").unwrap();
    let removed = remove_leftovers(&out).unwrap();
    assert_eq!(removed.len(), 1);
    assert!(listing(dir.path()).is_empty());
    // One in flight is not.
    let _tmp = TempOutput::file(&out).unwrap();
    assert!(remove_leftovers(&out).unwrap().is_empty());
    assert_eq!(listing(dir.path()).len(), 1);
}

#[test]
fn final_path_names_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let tmp = TempOutput::folder(&out).unwrap();
    assert_eq!(tmp.final_path(tmp.path()), out);
    assert_eq!(tmp.final_path(&tmp.path().join("a/b")), out.join("a/b"));
    assert_eq!(
        tmp.final_path(Path::new("/elsewhere")),
        Path::new("/elsewhere")
    );
    assert_eq!(tmp.output(), out);
}
