//! Temporary checkpoint and model folders are tracked while they are written, so a process
//! ending on a signal removes them (`outputs::remove_unfinished`), and untracked once renamed.
//! Its own test binary: `remove_unfinished` empties one list for the whole process.

use std::path::{Path, PathBuf};

use cwseg_train::checkpoint::{replace, write_new_folder};
use cwseg_train::outputs::remove_unfinished;

/// Writes one file into `dir`, then (with `signal`) does what the signal handler does.
fn fill(dir: &Path, seen: &mut Option<PathBuf>, signal: bool) -> anyhow::Result<()> {
    *seen = Some(dir.to_path_buf());
    std::fs::write(dir.join("model.safetensors"), b"x")?;
    if signal {
        remove_unfinished();
    }
    Ok(())
}

/// The folder filled is gone after the interrupted write, the write fails and leaves nothing;
/// after a normal write the temporary path is no longer tracked.
fn check(write: impl Fn(&Path, &mut dyn FnMut(&Path) -> anyhow::Result<()>) -> anyhow::Result<()>) {
    let root = tempfile::tempdir().expect("tempdir");
    let out = root.path().join("model");
    let mut seen = None;
    let err = write(&out, &mut |d| fill(d, &mut seen, true)).expect_err("interrupted");
    let tmp = seen.take().expect("filled");
    assert!(!tmp.exists(), "{} stayed", tmp.display());
    assert!(!out.exists());
    assert!(
        err.to_string().contains("removed while it was written"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(root.path()).expect("dir").count(), 0);

    write(&out, &mut |d| fill(d, &mut seen, false)).expect("written");
    assert!(out.join("model.safetensors").exists());
    // a folder at the old temporary path is not removed: nothing stays tracked
    let tmp = seen.take().expect("filled");
    std::fs::create_dir_all(&tmp).expect("dir");
    remove_unfinished();
    assert!(tmp.exists(), "{} still tracked", tmp.display());
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn temporary_folders_are_removed_on_a_signal_and_untracked_when_done() {
    check(|out, f| write_new_folder(out, |d| f(d)));
    check(|out, f| replace(out, |d| f(d)));
}
