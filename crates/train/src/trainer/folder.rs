//! The run folder: the lock that gives it to one process, the files a run writes there
//! ([`RUN_FILES`]), the checks before a new or resumed run touches it, and the removal of a
//! new run's files when it fails before its first checkpoint.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::recorded::{differences, read_run_config};
use super::resume::{check_resume, resume_reference};
use crate::config::TrainConfig;

/// Takes the run folder `dir` (created if missing) for this process: an exclusive lock on
/// `dir/.lock`, held while the returned file lives. Another process writing the folder (a
/// second `train --out` of the same folder) is refused instead of mixing two runs into one.
/// Returns the lock and whether the folder was created.
pub(super) fn lock_run_folder(dir: &Path) -> Result<(fs::File, bool)> {
    let created = !dir.exists();
    fs::create_dir_all(dir)
        .with_context(|| format!("creating the run folder {}", dir.display()))?;
    let path = dir.join(".lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok((file, created)),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "{} is being written by another cwseg process (it holds {}); wait for it to end, \
             or choose another --out",
            dir.display(),
            path.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// The files and folders a run writes into its folder: `train.toml`, then the checkpoints
/// (the file a refusal names is the first found).
const RUN_FILES: [&str; 11] = [
    "train.toml",
    "last",
    "best",
    "last.partial",
    "last.previous",
    "best.partial",
    "best.previous",
    "state.json",
    "curves.png",
    "metrics.jsonl",
    "split.json",
];

/// Whether `dir` holds any of a run's files.
pub(super) fn holds_run_files(dir: &Path) -> bool {
    RUN_FILES.iter().any(|f| dir.join(f).exists())
}

/// Removes a run's files from `dir` (a new run that failed before its first checkpoint in a
/// folder that held none), best effort.
pub(super) fn remove_run_files(dir: &Path) {
    for name in RUN_FILES {
        let path = dir.join(name);
        let _ = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

/// Creates the run folder and checks it: a new run must not overwrite one ([`check_new_run`]);
/// a resumed one (rank 0 first finishes any interrupted checkpoint replacement) must keep the
/// configuration its checkpoint was trained with ([`check_resume`]). Touches no file of a run
/// it refuses. Returns whether a resumed run is extended.
pub(super) fn prepare_folder(
    config: &TrainConfig,
    dir: &Path,
    resume: bool,
    rank0: bool,
) -> Result<bool> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating the run folder {}", dir.display()))?;
    if !resume {
        check_new_run(config, dir, rank0)?;
        return Ok(false);
    }
    if rank0 {
        for checkpoint in ["last", "best"] {
            crate::checkpoint::recover(&dir.join(checkpoint))?;
        }
    }
    let (path, saved) = resume_reference(dir)?;
    check_resume(&path, &saved, config)
}

/// Refuses to start a new run in a folder that holds one, naming the file found: a
/// checkpoint, `curves.png`, `state.json`, or `metrics.jsonl`, `split.json` and `train.toml` of
/// another configuration. A `train.toml` of this same configuration without a checkpoint is
/// this run killed before its first checkpoint: it starts again (its split kept).
fn check_new_run(config: &TrainConfig, dir: &Path, rank0: bool) -> Result<()> {
    let recorded = dir.join("train.toml");
    let restart = recorded.exists();
    if restart {
        let differing = differences(&read_run_config(dir)?, config)?;
        if let Some(first) = differing.first() {
            bail!(
                "{} holds another run: its {} records {first}; continue it with its own \
                 settings (`cwseg train --resume`; a grid or `cwseg cv` resumes its runs when \
                 rerun unchanged), or choose another --out",
                dir.display(),
                recorded.display()
            );
        }
        if rank0 {
            for checkpoint in ["last", "best"] {
                crate::checkpoint::recover(&dir.join(checkpoint))?;
            }
        }
    }
    let found = RUN_FILES.iter().skip(1).find(|name| {
        let path = dir.join(name);
        match **name {
            "split.json" | "metrics.jsonl" if restart => false,
            "metrics.jsonl" => fs::metadata(&path).is_ok_and(|m| m.len() > 0),
            _ => path.exists(),
        }
    });
    if let Some(name) = found {
        bail!(
            "{} already holds a run ({} found); continue it with --resume or choose another --out",
            dir.display(),
            dir.join(name).display()
        );
    }
    Ok(())
}
