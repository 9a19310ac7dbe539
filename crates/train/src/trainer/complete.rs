//! Runs driven to their end by a command that trains several (an experiment's grid, a
//! cross-validation's folds): a complete run is left alone, one with a checkpoint resumed, any
//! other started, so that the command can be run again after an interruption.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::resume::{check_resume, resume_reference};
use super::{Interrupted, RunOptions, RunState, TrainHooks, TrainOutcome, train};
use crate::config::TrainConfig;
use crate::outputs::modified;

/// Trains the run in `dir` (synthetic data written to `data_dir`) to its end: nothing when it
/// is complete ([`is_complete`]); else resumed from `last/` where a checkpoint is there (an
/// interrupted checkpoint replacement recovered first), else started. Returns the training's
/// outcome, `None` for a complete run; a run a hook stopped is an [`Interrupted`] error whose
/// message names `what`.
pub fn train_to_end(
    config: &TrainConfig,
    dir: &Path,
    data_dir: &Path,
    hooks: &mut dyn TrainHooks,
    what: &str,
) -> Result<Option<TrainOutcome>> {
    crate::checkpoint::recover(&dir.join("last"))?;
    if is_complete(config, dir)? {
        tracing::info!(run = %dir.display(), "the run is complete; nothing to train");
        return Ok(None);
    }
    let options = RunOptions {
        resume: dir.join("last").join("state.json").exists(),
        data_dir: Some(data_dir.to_path_buf()),
        communicator: None,
    };
    let outcome = train(config, dir, &options, hooks)?;
    if outcome.interrupted {
        return Err(Interrupted(format!(
            "interrupted during {what}; run the same command again to continue"
        ))
        .into());
    }
    Ok(Some(outcome))
}

/// Whether the run in `dir` is complete for `config`, so that nothing is opened, loaded or
/// rewritten for it: its last checkpoint says training finished, `config` does not extend it
/// (more epochs than it ran), and the end of the run (post-processing, then `curves.png`) ran
/// after that checkpoint was written — `curves.png` is no older than `last/state.json`. A run
/// recorded with another configuration is refused as its resumption would be, naming the field
/// and the file.
pub fn is_complete(config: &TrainConfig, dir: &Path) -> Result<bool> {
    let state_path = dir.join("last").join("state.json");
    let Some(checkpointed) = modified(&state_path)? else {
        return Ok(false);
    };
    let text = fs::read_to_string(&state_path)
        .with_context(|| format!("reading {}", state_path.display()))?;
    let state: RunState = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a run state", state_path.display()))?;
    if !state.finished {
        return Ok(false);
    }
    let (saved_path, saved) = resume_reference(dir)?;
    if check_resume(&saved_path, &saved, config)? && state.epoch < config.epochs {
        return Ok(false);
    }
    Ok(modified(&dir.join("curves.png"))?.is_some_and(|ended| ended >= checkpointed))
}
