//! Where a command will write, checked before it writes anything: no output is one of its
//! inputs, no two outputs are one file, and no output lands inside a folder it must not touch
//! (a model folder). Paths are compared after resolving them, so two spellings of one place
//! (`a/../b`, a symbolic link, a hard link) are caught whether or not the file exists yet.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

/// `path` made absolute, with `.` and `..` folded and the symbolic links of every existing
/// prefix resolved; the parts that do not exist yet are appended as written.
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            // `out` is canonical up to its last existing part, so popping is exact
            Component::ParentDir => {
                out.pop();
            }
            other => {
                out.push(other);
                if let Ok(full) = out.canonicalize() {
                    out = full;
                }
            }
        }
    }
    out
}

/// The modification time of `path`, `None` where there is no such file: what tells whether an
/// output was written after what it was made from (a run's end after its last checkpoint, an
/// out-of-fold prediction after its model's weights).
pub fn modified(path: &Path) -> Result<Option<std::time::SystemTime>> {
    match std::fs::metadata(path) {
        Ok(meta) => Ok(Some(meta.modified().with_context(|| {
            format!("the modification time of {}", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Whether `a` and `b` are one file or folder: the same resolved path, or (both existing) the
/// same device and inode (hard links).
pub fn same_place(a: &Path, b: &Path) -> bool {
    if resolve(a) == resolve(b) {
        return true;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
}

/// Refuses an output whose existing folder cannot take a new file (read-only, no permission),
/// found by creating and removing a small file there: so that a command with two outputs
/// cannot write the first and fail on the second. An existing non-regular destination (a FIFO,
/// a device) is written in place, so its folder is not probed; a folder in `known` was probed
/// already. Returns the folder probed.
fn check_writable(
    source: &str,
    given: &Path,
    resolved: &Path,
    known: &std::collections::BTreeSet<PathBuf>,
) -> Result<Option<PathBuf>> {
    if std::fs::metadata(resolved).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return Ok(None);
    }
    let Some(folder) = resolved
        .parent()
        .filter(|p| p.is_dir() && !known.contains(*p))
    else {
        return Ok(None);
    };
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = folder.join(format!(".cwseg-probe-{}-{n}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(Some(folder.to_path_buf()))
        }
        Err(e) => bail!(
            "{source} {}: the folder {} cannot take a new file ({e})",
            given.display(),
            folder.display()
        ),
    }
}

/// One planned output: the flag or case that asks for it, the path as given, and resolved.
#[derive(Debug, Clone)]
struct Planned {
    source: String,
    given: PathBuf,
    resolved: PathBuf,
}

/// The files and folders a command will write, each checked as it is added.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    planned: Vec<Planned>,
    /// Folders already found to take new files (probed once each).
    writable: std::collections::BTreeSet<PathBuf>,
}

impl Outputs {
    /// No outputs yet.
    pub fn new() -> Outputs {
        Outputs::default()
    }

    /// Adds `path`, written for `source` (a flag such as `--csv`, or a case); refuses a path
    /// that another output already takes, or that lies inside or around another output folder.
    pub fn add(&mut self, source: &str, path: &Path) -> Result<()> {
        let resolved = resolve(path);
        for other in &self.planned {
            if other.resolved == resolved
                || resolved.starts_with(&other.resolved)
                || other.resolved.starts_with(&resolved)
            {
                bail!(
                    "{source} and {} would both write {}{}; give them different outputs",
                    other.source,
                    path.display(),
                    if other.given == path {
                        String::new()
                    } else {
                        format!(" (also named {})", other.given.display())
                    }
                );
            }
        }
        if let Some(folder) = check_writable(source, path, &resolved, &self.writable)? {
            self.writable.insert(folder);
        }
        self.planned.push(Planned {
            source: source.to_string(),
            given: path.to_path_buf(),
            resolved,
        });
        Ok(())
    }

    /// Refuses an output that is one of `inputs` (`(what, path)`, e.g. `("--label", l)`).
    pub fn refuse_inputs(&self, inputs: &[(&str, &Path)]) -> Result<()> {
        for output in &self.planned {
            for (what, input) in inputs {
                if same_place(&output.given, input) {
                    bail!(
                        "{} {} is the input {what} {}: it would be overwritten; choose another output",
                        output.source,
                        output.given.display(),
                        input.display()
                    );
                }
            }
        }
        Ok(())
    }

    /// Refuses an output inside `folder` (or the folder itself), which `what` names (e.g.
    /// "the model folder").
    pub fn refuse_inside(&self, folder: &Path, what: &str) -> Result<()> {
        let folder_resolved = resolve(folder);
        for output in &self.planned {
            if output.resolved.starts_with(&folder_resolved) {
                bail!(
                    "{} ({}) lies inside {what} {}: writing there could overwrite it; write \
                     elsewhere",
                    output.given.display(),
                    output.source,
                    folder.display()
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_place_are_one_output() {
        let dir = tempfile::tempdir().expect("dir");
        let a = dir.path().join("a.nii.gz");
        let mut outputs = Outputs::new();
        outputs.add("--output", &a).expect("first");
        let other = dir.path().join("sub").join("..").join("a.nii.gz");
        let err = outputs.add("--png", &other).expect_err("same file");
        assert!(err.to_string().contains("--output"), "{err}");
        // a file inside a planned output folder collides with it too
        outputs
            .add("case x", &dir.path().join("p"))
            .expect("folder");
        assert!(outputs.add("case y", &dir.path().join("p/q")).is_err());
        assert!(outputs.add("case z", &dir.path().join("b.nii.gz")).is_ok());
    }

    #[test]
    fn an_input_or_a_protected_folder_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let label = dir.path().join("label.nii.gz");
        std::fs::write(&label, b"x").expect("write");
        let link = dir.path().join("link.nii.gz");
        std::fs::hard_link(&label, &link).expect("link");
        let mut outputs = Outputs::new();
        outputs.add("--csv", &link).expect("add");
        assert!(outputs.refuse_inputs(&[("--label", &label)]).is_err());
        let model = dir.path().join("model");
        std::fs::create_dir(&model).expect("model");
        let mut outputs = Outputs::new();
        outputs
            .add(
                "--output",
                &model.join("x").join("..").join("model.safetensors"),
            )
            .expect("add");
        let err = outputs
            .refuse_inside(&model, "the model folder")
            .expect_err("inside");
        assert!(err.to_string().contains("model folder"), "{err}");
    }
}

/// Temporary files and folders being written now, removed by [`remove_unfinished`] when a
/// signal ends the process before they are renamed into place.
static UNFINISHED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Records `path` as unfinished until the returned guard is dropped (after the rename, or on an
/// error, when its owner removes it).
#[must_use = "the path is tracked only while the guard lives"]
pub fn track_unfinished(path: &Path) -> Unfinished {
    if let Ok(mut list) = UNFINISHED.lock() {
        list.push(path.to_path_buf());
    }
    Unfinished {
        path: path.to_path_buf(),
    }
}

/// A path tracked by [`track_unfinished`].
#[derive(Debug)]
pub struct Unfinished {
    path: PathBuf,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Ok(mut list) = UNFINISHED.lock()
            && let Some(i) = list.iter().rposition(|p| *p == self.path)
        {
            list.swap_remove(i);
        }
    }
}

/// Removes every unfinished temporary file or folder (for a process about to exit on a signal:
/// an interrupted `export` or `import` leaves no hidden folder behind).
pub fn remove_unfinished() {
    let paths = match UNFINISHED.lock() {
        Ok(mut list) => std::mem::take(&mut *list),
        Err(_) => return,
    };
    for path in paths {
        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
    }
}
