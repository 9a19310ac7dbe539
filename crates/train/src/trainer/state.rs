//! The run state saved with the last checkpoint (`last/state.json`) and its check against
//! the optimizer state saved beside it.

use std::path::Path;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::optim::ScalerState;

/// Progress state saved with the last checkpoint (`last/state.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// The epoch in progress (or next to start).
    pub epoch: usize,
    /// Batches of that epoch already done.
    pub batch: usize,
    /// Sum of the losses of those batches.
    pub loss_sum: f64,
    /// Best validation DSC so far.
    pub best_dice: Option<f64>,
    /// Its epoch.
    pub best_epoch: Option<usize>,
    /// Whether training finished.
    pub finished: bool,
    /// Batches whose step was skipped for a non-finite gradient (loss scaling); every other
    /// batch is one optimizer step.
    #[serde(default)]
    pub skipped_steps: u64,
    /// The loss scaler's state, in runs that scale the loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<ScalerState>,
    /// SHA-256 of the `optimizer.safetensors` beside it (hex), written with the checkpoint;
    /// resuming refuses a file that differs (checkpoints before this field are not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_sha256: Option<String>,
}

/// Refuses a run state that disagrees with the optimizer saved beside it: every batch is one
/// optimizer step or a skipped one, so `epoch · batches_per_epoch + batch` must equal the
/// saved step count plus `skipped_steps` (an edited `state.json` would otherwise skip or repeat
/// epochs silently).
pub(super) fn check_state(
    path: &Path,
    state: &RunState,
    config: &TrainConfig,
    steps: u64,
) -> Result<()> {
    let expected = (state.epoch as u64)
        .checked_mul(config.batches_per_epoch as u64)
        .and_then(|s| s.checked_add(state.batch as u64));
    let done = steps.checked_add(state.skipped_steps);
    if state.batch > config.batches_per_epoch || expected.is_none() || expected != done {
        bail!(
            "{}: epoch {} batch {} of {} batches per epoch disagrees with the {steps} steps of \
             optimizer.safetensors beside it and {} skipped steps; the checkpoint was edited or \
             mixed from two runs (restore it, or train into a new folder)",
            path.display(),
            state.epoch,
            state.batch,
            config.batches_per_epoch,
            state.skipped_steps
        );
    }
    Ok(())
}
