//! How a run is watched and what it reports: [`TrainHooks`] (and [`NoHooks`]), the reports
//! they receive ([`RunStart`], [`StepReport`], [`EpochReport`]), the [`TrainOutcome`] of a run
//! and the [`Interrupted`] cause of a run a hook stopped.

use std::path::PathBuf;

use super::RunState;

/// Where a run stands when [`Trainer::run`](super::Trainer::run) starts.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStart {
    /// `"unet cwcd"`: the network's and the loss's names.
    pub name: String,
    /// Optimizer steps of the whole run (epochs × batches per epoch).
    pub total_steps: u64,
    /// Steps already done (a resumed run).
    pub done_steps: u64,
}

/// After every optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The epoch (0-based).
    pub epoch: usize,
    /// Epochs of the run.
    pub epochs: usize,
    /// Batches of the epoch done, this one included.
    pub batch: usize,
    /// This step's loss.
    pub loss: f64,
    /// Mean loss of the epoch so far.
    pub mean_loss: f64,
    /// Learning rate of the epoch.
    pub lr: f64,
    /// Patches per second over this invocation's steps of the epoch.
    pub patches_per_second: f64,
    /// Best validation DSC so far.
    pub best_dice: Option<f64>,
}

/// After every epoch: what `metrics.jsonl` records.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochReport {
    /// The epoch (1-based, as in `metrics.jsonl`).
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Learning rate.
    pub lr: f64,
    /// Mean foreground validation DSC (validated epochs only).
    pub val_dice: Option<f64>,
    /// Validation DSC of each foreground class (NaN: in no case's prediction or label).
    pub val_dice_per_class: Option<Vec<f64>>,
    /// Wall time of the epoch, seconds.
    pub seconds: f64,
    /// Training patches per second.
    pub patches_per_second: f64,
    /// Whether this epoch's checkpoint became `best/`.
    pub improved: bool,
    /// Whether validation stalled for `validation.patience` epochs (the run stops).
    pub stalled: bool,
}

/// Callbacks of [`Trainer::run`](super::Trainer::run); every method has an empty default. The `cwseg` command's
/// progress bar and Ctrl-C handling are one implementation; [`NoHooks`] is none.
pub trait TrainHooks {
    /// Before the first step of this invocation.
    fn started(&mut self, _run: &RunStart) {}
    /// After every optimizer step.
    fn step(&mut self, _report: &StepReport) {}
    /// After every epoch, once its checkpoints are written.
    fn epoch(&mut self, _report: &EpochReport) {}
    /// Asked after every step: `true` saves `last/` and stops (the outcome says `interrupted`).
    fn should_stop(&mut self) -> bool {
        false
    }
    /// When [`Trainer::run`](super::Trainer::run) returns without error.
    fn finished(&mut self, _outcome: &TrainOutcome, _state: &RunState) {}
}

/// Hooks that do nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl TrainHooks for NoHooks {}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The run folder.
    pub dir: PathBuf,
    /// Best validation DSC.
    pub best_dice: Option<f64>,
    /// Whether training stopped early (Ctrl-C).
    pub interrupted: bool,
    /// Wall time of this invocation, seconds.
    pub seconds: f64,
}

/// A run stopped by a hook ([`TrainHooks::should_stop`]: Ctrl-C or SIGTERM in the `cwseg`
/// command) after saving what can be resumed; the command exits with 130 or 143, as a shell
/// reports those signals.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}
