//! Checkpoint folders replaced as a whole: a process killed at any moment leaves either the
//! previous checkpoint or the new one, never the weights of one with the state of the other.
//!
//! The new files go to `NAME.partial/`; only once all are written is `NAME/` renamed to
//! `NAME.previous/`, `NAME.partial/` to `NAME/`, and `NAME.previous/` removed. [`recover`] puts
//! back a consistent `NAME/` after a kill between those steps. (Against a killed process the
//! page cache is enough; no fsync, so a power cut may still lose the newest checkpoint.)

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!("{name}.{suffix}"))
}

fn remove_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

/// Refuses to rename `tmp` into place when it is gone: removed while it was filled (by
/// [`crate::outputs::remove_unfinished`], a process ending on a signal).
fn check_still_there(tmp: &Path) -> Result<()> {
    if !tmp.is_dir() {
        bail!(
            "{} was removed while it was written (interrupted); nothing was replaced",
            tmp.display()
        );
    }
    Ok(())
}

/// Replaces the folder `dir` by the files `write` puts into the fresh folder it is given. The
/// `.partial` folder is tracked ([`crate::outputs::track_unfinished`]) until it is renamed, so a
/// process ending on a signal removes it.
pub fn replace(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    recover(dir)?;
    let partial = sibling(dir, "partial");
    let previous = sibling(dir, "previous");
    remove_if_present(&partial)?;
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let _tracked = crate::outputs::track_unfinished(&partial);
    write(&partial)?;
    check_still_there(&partial)?;
    if dir.exists() {
        rename(dir, &previous)?;
    }
    rename(&partial, dir)?;
    remove_if_present(&previous)
}

/// Makes `dir` the newest complete checkpoint after an interrupted [`replace`]: `dir` itself
/// when it exists; else a `.partial` that was complete (it is renamed only after its files are
/// written, so a `.partial` beside a `.previous` is complete); else the `.previous` one.
pub fn recover(dir: &Path) -> Result<()> {
    let partial = sibling(dir, "partial");
    let previous = sibling(dir, "previous");
    if dir.exists() {
        remove_if_present(&previous)?;
        return remove_if_present(&partial);
    }
    if previous.exists() {
        if partial.exists() {
            rename(&partial, dir)?;
            return remove_if_present(&previous);
        }
        return rename(&previous, dir);
    }
    // a first checkpoint cut short: nothing complete to restore
    remove_if_present(&partial)
}

/// Writes the new folder `out` whole: `fill` writes into a temporary folder beside it, which is
/// then renamed to `out`; on an error the temporary folder is removed and nothing is left. The
/// temporary folder is tracked ([`crate::outputs::track_unfinished`]) until the rename, so a
/// process ending on a signal (an interrupted `export` or `import`) removes it too.
pub fn write_new_folder(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".cwseg-model-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))?;
    let _tracked = crate::outputs::track_unfinished(tmp.path());
    fill(tmp.path())?;
    check_still_there(tmp.path())?;
    let kept = tmp.keep();
    fs::rename(&kept, out).with_context(|| format!("moving the new folder to {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, content: &str) -> Result<()> {
        fs::write(dir.join("a"), content)?;
        fs::write(dir.join("b"), content)?;
        Ok(())
    }

    fn read(dir: &Path) -> (String, String) {
        (
            fs::read_to_string(dir.join("a")).expect("a"),
            fs::read_to_string(dir.join("b")).expect("b"),
        )
    }

    #[test]
    fn every_interrupted_state_recovers_one_whole_checkpoint() {
        let root = tempfile::tempdir().expect("tempdir");
        let last = root.path().join("last");
        replace(&last, |d| write(d, "1")).expect("first");
        replace(&last, |d| write(d, "2")).expect("second");
        assert_eq!(read(&last), ("2".into(), "2".into()));
        let (partial, previous) = (sibling(&last, "partial"), sibling(&last, "previous"));
        // killed while writing the partial folder (one file of two): the old one stays
        fs::create_dir_all(&partial).expect("dir");
        fs::write(partial.join("a"), "3").expect("a");
        recover(&last).expect("recover");
        assert_eq!(read(&last), ("2".into(), "2".into()));
        assert!(!partial.exists());
        // killed after `last` became `previous`, before `partial` became `last`
        fs::create_dir_all(&partial).expect("dir");
        write(&partial, "3").expect("write");
        rename(&last, &previous).expect("rename");
        recover(&last).expect("recover");
        assert_eq!(read(&last), ("3".into(), "3".into()));
        assert!(!previous.exists() && !partial.exists());
        // killed after the swap, before `previous` was removed
        fs::create_dir_all(&previous).expect("dir");
        write(&previous, "2").expect("write");
        recover(&last).expect("recover");
        assert_eq!(read(&last), ("3".into(), "3".into()));
        assert!(!previous.exists());
        // only a previous one left
        rename(&last, &previous).expect("rename");
        recover(&last).expect("recover");
        assert_eq!(read(&last), ("3".into(), "3".into()));
    }
}
