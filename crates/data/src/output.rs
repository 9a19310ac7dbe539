//! Writing a file so that a reader never sees half of it and a failure keeps the old one: the
//! bytes go to a temporary file in the destination's folder, which is then renamed onto it.
//!
//! The destination is where `path` leads: a symbolic link's target is replaced, not the link
//! (the link stays a link); a FIFO, a character device or another file that is not a regular
//! file (`/dev/stdout`, `/dev/null`, a named pipe) is written in place, from the finished
//! temporary file, never replaced by a regular file. Temporary names are short
//! (`.cwseg-<pid>-<n>-tmp…`), so any name the file system allows can be written.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{DataError, Result};

/// Where a write to a path goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destination {
    /// A regular file, new or replaced: written beside it, then renamed onto it.
    Replace(PathBuf),
    /// An existing file that is not a regular file: written into, as it is.
    InPlace(PathBuf),
}

/// The destination of a write to `path`: symbolic links followed (a dangling link to its
/// target's path, relative to the link's folder).
fn destination(path: &Path) -> Destination {
    let mut target = path.to_path_buf();
    for _ in 0..40 {
        match fs::read_link(&target) {
            Ok(next) => {
                target = match target.parent() {
                    Some(dir) if next.is_relative() => dir.join(next),
                    _ => next,
                }
            }
            Err(_) => break,
        }
    }
    match fs::metadata(&target) {
        Ok(meta) if !meta.is_file() && !meta.is_dir() => Destination::InPlace(target),
        _ => Destination::Replace(target),
    }
}

/// A fresh temporary path in `target`'s folder ending in `suffix` (e.g. `.nii.gz`).
fn temporary_beside(target: &Path, suffix: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // no dot but the first and the suffix's: the NIfTI writer rebuilds extensions from the last
    target.with_file_name(format!(".cwseg-{}-{n}-tmp{suffix}", std::process::id()))
}

/// Writes `path` through a temporary file: `write` fills the temporary path it is given (which
/// ends in `suffix`), then it replaces the destination whole (see the module). Errors name
/// `path`; the temporary file never outlives a failure.
pub fn write_via_temporary(
    path: &Path,
    suffix: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let (target, in_place) = match destination(path) {
        Destination::Replace(t) => (t, false),
        Destination::InPlace(t) => (t, true),
    };
    let tmp = temporary_beside(if in_place { path } else { &target }, suffix);
    let tmp = if in_place && tmp.parent().is_some_and(|d| fs::metadata(d).is_err()) {
        std::env::temp_dir().join(tmp.file_name().unwrap_or_default())
    } else {
        tmp
    };
    let result = write(&tmp).and_then(|()| {
        if in_place {
            copy_into(&tmp, &target).map_err(|e| DataError::io(path, e))
        } else {
            fs::rename(&tmp, &target).map_err(|e| DataError::io(path, e))
        }
    });
    if result.is_err() || in_place {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Streams the finished file `from` into the existing non-regular file `to`.
fn copy_into(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut source = fs::File::open(from)?;
    let mut sink = fs::OpenOptions::new().write(true).open(to)?;
    std::io::copy(&mut source, &mut sink)?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file ([`write_via_temporary`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // errors name `path`, never the temporary
    write_via_temporary(path, "", |tmp| {
        fs::write(tmp, bytes).map_err(|e| DataError::io(path, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_keeps_pointing_at_its_target_which_is_replaced() {
        let dir = tempfile::tempdir().expect("dir");
        let target = dir.path().join("target.csv");
        fs::write(&target, "old").expect("write");
        let link = dir.path().join("link.csv");
        std::os::unix::fs::symlink("target.csv", &link).expect("link");
        write_atomic(&link, b"new").expect("written");
        assert!(fs::symlink_metadata(&link).expect("link").is_symlink());
        assert_eq!(fs::read_to_string(&target).expect("target"), "new");
        // a dangling link gets its target created
        let dangling = dir.path().join("dangling.csv");
        std::os::unix::fs::symlink("made.csv", &dangling).expect("link");
        write_atomic(&dangling, b"x").expect("written");
        assert_eq!(
            fs::read_to_string(dir.path().join("made.csv")).expect("made"),
            "x"
        );
        assert!(fs::symlink_metadata(&dangling).expect("link").is_symlink());
    }

    #[test]
    fn a_device_is_written_into_not_replaced() {
        write_atomic(Path::new("/dev/null"), b"gone").expect("written");
        let meta = fs::metadata("/dev/null").expect("null");
        assert!(!meta.is_file(), "/dev/null is still a device");
    }

    #[test]
    fn the_longest_file_name_can_be_written() {
        let dir = tempfile::tempdir().expect("dir");
        let name = format!("{}.nii.gz", "a".repeat(248));
        let path = dir.path().join(&name);
        write_atomic(&path, b"x").expect("a 255-byte name");
        assert_eq!(fs::read(&path).expect("read"), b"x");
    }

    #[test]
    fn a_write_into_a_missing_folder_names_the_file_not_its_temporary() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("missing").join("plan.toml");
        let err = write_atomic(&path, b"x")
            .expect_err("no folder")
            .to_string();
        assert!(
            err.contains("missing/plan.toml") && !err.contains(".cwseg-"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keep.txt");
        fs::write(&path, "old").expect("write");
        let err = write_via_temporary(&path, "", |_| Err(DataError::Invalid("no".into())));
        assert!(err.is_err());
        assert_eq!(fs::read_to_string(&path).expect("kept"), "old");
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 1);
    }
}
