//! The training loop as a library. [`Trainer::open`] starts a run in a folder or resumes it
//! from `last/`; [`Trainer::run`] steps through the loader's batches, validates by
//! sliding-window inference each epoch, keeps the best and last checkpoints, writes
//! `metrics.jsonl` and `curves.png`, stops cleanly on a non-finite loss or when a hook asks,
//! and decides the post-processing at the end. [`TrainHooks`] is how a progress bar, a logger
//! or a stop signal watch it; [`train`] runs one configuration to the end.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, ModuleT};
use candle_nn::VarMap;
use cwseg_data::{
    Batch, BatchParts, EpochLoader, LoaderConfig, PatchMaps, SamplerConfig, SamplingVolume, argmax,
};
use cwseg_losses::{Loss, Target};
use cwseg_models::{Network, seeded_var_builder, weights};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::card::{ModelCard, load_model};
use crate::config::{ContourMaps, TrainConfig};
use crate::device::parse_device;
use crate::distributed::{self, Communicator, Single};
use crate::optim::{LossScaler, Optimizer, ScalerState};
use crate::postprocess;
use crate::predict::predict_probabilities;
use crate::prepare::{PreparedCase, PreparedData, open_data};
use crate::validate::{case_dice, mean_foreground};

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

/// What a checkpoint that can be resumed holds besides the weights and the card.
struct Resumable<'a> {
    /// The optimizer (`optimizer.safetensors`).
    optimizer: &'a Optimizer,
    /// The run state (`state.json`, with the optimizer file's digest added).
    state: &'a RunState,
    /// The run's configuration (`train.toml`: what these weights were trained with).
    config: &'a TrainConfig,
}

/// Writes the checkpoint folder `dir` (weights, card, and with `resumable` the optimizer, run
/// state and configuration) as a whole ([`crate::checkpoint::replace`]).
fn save_checkpoint(
    dir: &Path,
    vars: &VarMap,
    card: &ModelCard,
    resumable: Option<Resumable>,
) -> Result<()> {
    let metadata: HashMap<String, String> = [
        ("cwseg_version".to_string(), card.cwseg_version.clone()),
        ("model".to_string(), card.model.name().to_string()),
        ("loss".to_string(), serde_json::to_string(&card.loss)?),
    ]
    .into_iter()
    .collect();
    crate::checkpoint::replace(dir, |tmp| {
        let weights_path = tmp.join("model.safetensors");
        weights::save(vars, &weights_path, DType::F32, &metadata)?;
        let card = card.with_weights_digest(&weights_path)?;
        cwseg_data::dataset::write_atomic(
            &tmp.join("config.json"),
            serde_json::to_string_pretty(&card)?.as_bytes(),
        )?;
        if let Some(r) = resumable {
            let optimizer_path = tmp.join("optimizer.safetensors");
            r.optimizer.save(&optimizer_path)?;
            let state = RunState {
                optimizer_sha256: Some(crate::card::sha256_file(&optimizer_path)?),
                ..r.state.clone()
            };
            cwseg_data::dataset::write_atomic(
                &tmp.join("state.json"),
                serde_json::to_string_pretty(&state)?.as_bytes(),
            )?;
            cwseg_data::dataset::write_atomic(
                &tmp.join("train.toml"),
                toml::to_string_pretty(r.config)?.as_bytes(),
            )?;
        }
        Ok(())
    })
}

/// Refuses a run state that disagrees with the optimizer saved beside it: every batch is one
/// optimizer step or a skipped one, so `epoch · batches_per_epoch + batch` must equal the
/// saved step count plus `skipped_steps` (an edited `state.json` would otherwise skip or repeat
/// epochs silently).
fn check_state(path: &Path, state: &RunState, config: &TrainConfig, steps: u64) -> Result<()> {
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

/// Keeps the lines of `metrics.jsonl` of the epochs before `epochs` (a run killed after an
/// epoch's line but before its checkpoint repeats that epoch on resume).
fn truncate_metrics(path: &Path, epochs: usize) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["epoch"].as_u64())
                .is_some_and(|e| e as usize <= epochs)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept != text {
        cwseg_data::dataset::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// The configuration a run folder was trained with (`RUN/train.toml`; also the one inside
/// each resumable checkpoint, `RUN/last/train.toml`).
pub fn read_run_config(dir: &Path) -> Result<TrainConfig> {
    let path = dir.join("train.toml");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("--resume: reading {}", path.display()))?;
    crate::config::parse_toml(&text, &path).context("not a training configuration")
}

/// A field in which two run configurations differ: its dotted name and both values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Difference {
    /// `optimizer.lr`, `patch`, …
    pub field: String,
    /// The recorded value (TOML; `(absent)` where the field is missing).
    pub saved: String,
    /// The value asked for now.
    pub given: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (recorded {}, now {})",
            self.field, self.saved, self.given
        )
    }
}

/// A TOML value on one line, `(absent)` for none.
fn show(value: Option<&toml::Value>) -> String {
    value.map_or_else(
        || "(absent)".to_string(),
        |v| v.to_string().trim().replace('\n', ", "),
    )
}

/// Appends to `out` every leaf of `a` and `b` (tables walked by key) that differs.
fn walk(a: Option<&toml::Value>, b: Option<&toml::Value>, path: &str, out: &mut Vec<Difference>) {
    if let (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) = (a, b) {
        let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
        for key in keys {
            let name = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            walk(x.get(key), y.get(key), &name, out);
        }
    } else if a != b {
        out.push(Difference {
            field: path.to_string(),
            saved: show(a),
            given: show(b),
        });
    }
}

/// The fields in which `given` differs from `saved`, leaving out those a resumed run may
/// change: `device` and `workers` (callers check `epochs` by their own rule).
pub(crate) fn differences(saved: &TrainConfig, given: &TrainConfig) -> Result<Vec<Difference>> {
    // the network's channels, classes and UNETR's input size come from the data and the patch:
    // train.toml records the run's, a configuration given beside --resume may hold defaults
    let derived_cleared = |c: &TrainConfig| TrainConfig {
        model: c.model.with_io(0, 0).with_input_size(c.patch),
        ..c.clone()
    };
    let mut out = Vec::new();
    walk(
        Some(&toml::Value::try_from(derived_cleared(saved))?),
        Some(&toml::Value::try_from(derived_cleared(given))?),
        "",
        &mut out,
    );
    out.retain(|d| !matches!(d.field.as_str(), "device" | "workers"));
    Ok(out)
}

/// Decides the post-processing on the validation cases with the best checkpoint and records
/// it in `best/config.json`; nothing to do without validation cases, when the configuration
/// says not to, or when the card has it already.
fn decide_postprocessing(
    dir: &Path,
    val_cases: &[PreparedCase],
    config: &TrainConfig,
    device: &Device,
) -> Result<()> {
    if val_cases.is_empty() || !config.validation.postprocess {
        return Ok(());
    }
    let (network, mut card, best) = load_model(dir, device)?;
    if card.postprocessing.is_some() {
        return Ok(());
    }
    let mut predictions = Vec::with_capacity(val_cases.len());
    for case in val_cases {
        let probs = predict_probabilities(
            &network,
            &case.image.data,
            card.classes.len(),
            card.patch,
            card.sliding_window(config.validation.overlap),
            2,
            device,
        )?;
        predictions.push(argmax(probs.view()));
    }
    let labels: Vec<_> = val_cases.iter().map(|c| c.label.data.clone()).collect();
    let decided = postprocess::decide(&predictions, &labels, &card.classes, &card.label_values);
    tracing::info!(
        keep_largest = ?decided.keep_largest.iter().map(|g| &g.name).collect::<Vec<_>>(),
        before = decided.validation_dice_before,
        after = decided.validation_dice_after,
        "post-processing decided on the validation cases"
    );
    card.postprocessing = Some(decided);
    cwseg_data::dataset::write_atomic(
        &best.join("config.json"),
        serde_json::to_string_pretty(&card)?.as_bytes(),
    )?;
    Ok(())
}

/// The maps the loader makes with each patch: under [`ContourMaps::Volume`], the contour map
/// (every class, background included: the loss takes each class's own contour from it) of a
/// loss that uses one.
fn patch_maps(config: &TrainConfig) -> PatchMaps {
    let contour = match config.contour_maps {
        ContourMaps::Volume => config.loss.contour(),
        ContourMaps::Patch => None,
    };
    PatchMaps {
        contour: contour.map(|c| cwseg_morphology::ContourSpec {
            erosion: c.erosion(),
            include_background: true,
        }),
    }
}

/// The training cases ready for sampling; under [`ContourMaps::Volume`] a DWCE loss's weight
/// maps are made here, once per case on the whole preprocessed volume (voxel units, as the
/// loss's own).
fn sampling_volumes(config: &TrainConfig, cases: Vec<PreparedCase>) -> Result<Vec<SamplingVolume>> {
    let dwce = match config.contour_maps {
        ContourMaps::Volume => config.loss.dwce(),
        ContourMaps::Patch => None,
    };
    cases
        .into_iter()
        .map(|c| {
            let weights = dwce
                .map(|spec| cwseg_morphology::dwce_weight_map(c.label.data.view(), None, &spec))
                .transpose()
                .with_context(|| format!("DWCE weight map of case {}", c.id))?;
            let volume = SamplingVolume::new(c.image.data, c.label.data, config.patch)?;
            Ok(match weights {
                Some(w) => volume.with_weights(w)?,
                None => volume,
            })
        })
        .collect()
}

/// Options of one invocation that are not part of the run's configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue the run in the folder from its last checkpoint, with the configuration and
    /// the split (`split.json`) it recorded: cases added to the data set since are not used.
    pub resume: bool,
    /// Where the synthetic data set is written (default `RUN/data`).
    pub data_dir: Option<PathBuf>,
    /// The data-parallel group this process trains in (default: alone).
    pub communicator: Option<Rc<dyn Communicator>>,
}

/// Where a run stands when [`Trainer::run`] starts.
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

/// Callbacks of [`Trainer::run`]; every method has an empty default. The `cwseg` command's
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
    /// When [`Trainer::run`] returns without error.
    fn finished(&mut self, _outcome: &TrainOutcome, _state: &RunState) {}
}

/// Hooks that do nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl TrainHooks for NoHooks {}

/// A run in its folder: the network, optimizer, loss, data and progress of one configuration.
pub struct Trainer {
    config: TrainConfig,
    dir: PathBuf,
    device: Device,
    classes: usize,
    val_cases: Vec<PreparedCase>,
    volumes: Arc<Vec<SamplingVolume>>,
    loader: LoaderConfig,
    card: ModelCard,
    vars: VarMap,
    network: Network,
    optimizer: Optimizer,
    /// Dynamic loss scaling (f16 runs, or where the configuration asks for it).
    scaler: Option<LossScaler>,
    loss: Box<dyn Loss>,
    state: RunState,
    /// `metrics.jsonl`, open on rank 0 only.
    metrics: Option<fs::File>,
    comm: Rc<dyn Communicator>,
}

/// Trains `config` into `dir` to the end (or until a hook stops it). When a new run fails
/// before its first checkpoint (nothing to resume), what this call wrote is removed again: the
/// folder if it created it, else the run's files in a folder that held none.
pub fn train(
    config: &TrainConfig,
    dir: &Path,
    options: &RunOptions,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainOutcome> {
    config.validate()?;
    let rank0 = options.communicator.as_ref().is_none_or(|c| c.rank() == 0);
    // one process writes a run folder at a time; what follows is decided under the lock
    let (_lock, created) = match rank0 {
        true => {
            let (lock, created) = lock_run_folder(dir)?;
            (Some(lock), created)
        }
        false => (None, false),
    };
    let fresh = !options.resume && !holds_run_files(dir);
    let previous = cwseg_models::precision();
    // before `Trainer::open`, which records the precision in the model card (on CUDA this
    // opens the device once more than the trainer does)
    let device = parse_device(&config.device)?;
    let effective = cwseg_models::set_precision(config.precision, &device);
    let fallback;
    let config = if effective == config.precision {
        config
    } else {
        tracing::warn!(
            "precision {} needs {}; training in {effective} (recorded as precision = \"{effective}\" in {})",
            config.precision,
            config.precision.requirement(),
            dir.join("train.toml").display()
        );
        // the run records what it trained in: a resume elsewhere cannot switch precision
        fallback = TrainConfig {
            precision: effective,
            ..config.clone()
        };
        &fallback
    };
    let outcome = Trainer::open(config, dir, options).and_then(|t| t.run(hooks));
    cwseg_models::set_precision(previous, &device);
    // a checkpoint, or the previous one of a replacement cut short, is never removed
    let checkpointed = ["last", "last.previous"]
        .iter()
        .any(|c| dir.join(c).exists());
    if outcome.is_err() && rank0 && !checkpointed {
        if created {
            let _ = fs::remove_dir_all(dir);
        } else if fresh {
            remove_run_files(dir);
        }
    }
    outcome
}

/// Takes the run folder `dir` (created if missing) for this process: an exclusive lock on
/// `dir/.lock`, held while the returned file lives. Another process writing the folder (a
/// second `train --out` of the same folder) is refused instead of mixing two runs into one.
/// Returns the lock and whether the folder was created.
fn lock_run_folder(dir: &Path) -> Result<(fs::File, bool)> {
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
fn holds_run_files(dir: &Path) -> bool {
    RUN_FILES.iter().any(|f| dir.join(f).exists())
}

/// Removes a run's files from `dir` (a new run that failed before its first checkpoint in a
/// folder that held none), best effort.
fn remove_run_files(dir: &Path) {
    for name in RUN_FILES {
        let path = dir.join(name);
        let _ = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

/// Checks that `config` may resume the run whose recorded configuration is `saved` (read from
/// `saved_path`); returns whether it extends the run (more epochs).
fn check_resume(saved_path: &Path, saved: &TrainConfig, config: &TrainConfig) -> Result<bool> {
    let differing: Vec<String> = differences(saved, config)?
        .iter()
        .filter(|d| d.field != "epochs")
        .map(Difference::to_string)
        .collect();
    if !differing.is_empty() {
        bail!(
            "--resume: {} differ(s) from the run's {}; resume with the run's settings (only a larger --epochs extends it)",
            differing.join(", "),
            saved_path.display()
        );
    }
    if config.epochs < saved.epochs {
        bail!(
            "--resume: --epochs {} is fewer than the run's {}; a run can be extended, not shortened",
            config.epochs,
            saved.epochs
        );
    }
    Ok(config.epochs > saved.epochs)
}

/// Refuses a patch larger than any case after preprocessing.
fn check_patch_fits(patch: [usize; 3], cases: &[PreparedCase]) -> Result<()> {
    for case in cases {
        let shape = case.image.geometry.shape();
        if (0..3).any(|a| patch[a] > shape[a]) {
            bail!(
                "patch {patch:?} is larger than case {} after preprocessing {shape:?}: choose a patch no larger than the smallest case (or resample to a finer spacing)",
                case.id,
            );
        }
    }
    Ok(())
}

/// The loader's settings for `config` (two batches prefetched).
fn loader_config(config: &TrainConfig) -> LoaderConfig {
    LoaderConfig {
        batch_size: config.batch_size,
        batches_per_epoch: config.batches_per_epoch,
        workers: config.workers,
        prefetch: 2,
        sampler: SamplerConfig {
            size: config.patch,
            positive: config.positive,
            negative: config.negative,
            class_balanced: true,
        },
        augment: config.augment,
        maps: patch_maps(config),
        parts: BatchParts::all(config.batch_parts),
    }
}

/// Creates the run folder and checks it: a new run must not overwrite one ([`check_new_run`]);
/// a resumed one (rank 0 first finishes any interrupted checkpoint replacement) must keep the
/// configuration its checkpoint was trained with ([`check_resume`]). Touches no file of a run
/// it refuses. Returns whether a resumed run is extended.
fn prepare_folder(config: &TrainConfig, dir: &Path, resume: bool, rank0: bool) -> Result<bool> {
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

/// The configuration a resumed run must keep and its file: the one saved in the checkpoint
/// (`last/train.toml`), or in checkpoints written before it was saved there, `RUN/train.toml`.
fn resume_reference(dir: &Path) -> Result<(PathBuf, TrainConfig)> {
    let last = dir.join("last");
    let from = if last.join("train.toml").exists() {
        last
    } else {
        dir.to_path_buf()
    };
    Ok((from.join("train.toml"), read_run_config(&from)?))
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
                "{} holds another run: its {} records {first}; continue it with --resume and \
                 its settings, or choose another --out",
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

/// The data set and split of `config` with its preprocessing measured on the training cases,
/// and the model card of the run (the network sized for the data and the patch). The split is
/// the one recorded in `recorded_split` when that file exists (a resumed run keeps its cases:
/// cases added to the data set since are not used, and a recorded case that is gone is an
/// error naming it), else a new one from the configuration.
fn open_run_data(
    config: &TrainConfig,
    data_dir: &Path,
    recorded_split: &Path,
) -> Result<(PreparedData, ModelCard)> {
    let mut data = open_data(&config.data, config.seed, data_dir)?;
    if recorded_split.exists() {
        data = data.with_recorded_split(recorded_split)?;
    }
    data.preprocessing = data
        .preprocessing
        .measure(&data.dataset, &data.split.train)?;
    let model = config
        .model
        .with_io(data.dataset.modalities.len(), data.dataset.classes.len())
        .with_input_size(config.patch);
    let multiple = model.size_multiple();
    if config.patch.iter().any(|p| p % multiple != 0) {
        bail!(
            "patch {:?}: every side must be a multiple of {multiple} for this network",
            config.patch
        );
    }
    let card = ModelCard {
        cwseg_version: env!("CARGO_PKG_VERSION").to_string(),
        model,
        loss: Some(config.loss.clone()),
        classes: data.dataset.classes.clone(),
        label_values: data.dataset.label_values.clone(),
        modalities: data.dataset.modalities.clone(),
        preprocessing: data.preprocessing,
        patch: config.patch,
        overlap: config.validation.overlap,
        blend: Default::default(),
        window_weights: Default::default(),
        contour_maps: config.contour_maps,
        postprocessing: None,
        weights_sha256: None,
        precision: cwseg_models::precision(),
        origin: None,
    };
    Ok((data, card))
}

/// The configuration a run records (`train.toml`): `config` with the run's own network
/// (channels and classes from the data), not the configuration's defaults.
fn recorded_config(config: &TrainConfig, card: &ModelCard) -> TrainConfig {
    TrainConfig {
        model: card.model.clone(),
        ..config.clone()
    }
}

/// Records the run in its folder once it is known to open (rank 0, after the checkpoint of a
/// resumed run has loaded): `train.toml`, then `split.json` unless it is recorded already; a
/// new run (started again after it was killed before its first checkpoint) starts an empty
/// `metrics.jsonl`.
fn record_run(
    dir: &Path,
    config: &TrainConfig,
    card: &ModelCard,
    split: &cwseg_data::Split,
    resume: bool,
) -> Result<()> {
    cwseg_data::dataset::write_atomic(
        &dir.join("train.toml"),
        toml::to_string_pretty(&recorded_config(config, card))?.as_bytes(),
    )?;
    let split_path = dir.join("split.json");
    if !split_path.exists() {
        split.write(&split_path)?;
    }
    if !resume {
        truncate_metrics(&dir.join("metrics.jsonl"), 0)?;
    }
    Ok(())
}

/// `dir/metrics.jsonl`, opened for appending.
fn open_metrics(dir: &Path) -> Result<fs::File> {
    let path = dir.join("metrics.jsonl");
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

impl Trainer {
    /// Opens a run in `dir`: a new one (refused where the folder holds a run: a checkpoint,
    /// its history, or the `train.toml` of another configuration; a `train.toml` of this one
    /// without a checkpoint is the same run started again), or with `options.resume` the one
    /// there, from `last/` (refused where the configuration differs from the one the
    /// checkpoint was trained with in anything but a larger `epochs`, `device` or `workers`,
    /// or where a file of the checkpoint does not have its recorded SHA-256). A resumed run
    /// keeps the split recorded in `split.json` when it started: cases added to the data set
    /// since are not used. Loads and preprocesses the data, builds the network (seeded), loads
    /// the checkpoint, and only then writes `train.toml` and (unless recorded) `split.json`.
    pub fn open(config: &TrainConfig, dir: &Path, options: &RunOptions) -> Result<Trainer> {
        let comm = options
            .communicator
            .clone()
            .unwrap_or_else(|| Rc::new(Single));
        if !config.batch_parts.is_multiple_of(comm.size()) {
            bail!(
                "{} ranks: batch_parts = {} must be a multiple of the number of ranks (each rank trains on its own parts of every batch)",
                comm.size(),
                config.batch_parts
            );
        }
        let rank0 = comm.rank() == 0;
        let extended = prepare_folder(config, dir, options.resume, rank0)?;
        let last = options.resume.then(|| read_last(dir)).transpose()?;
        let device = parse_device(&config.device)?;
        let data_dir = options.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        let (data, card) = open_run_data(config, &data_dir, &dir.join("split.json"))?;
        if let Some(last) = &last {
            last.check_card(&card)?;
        }
        tracing::info!(
            cases = data.split.train.len(),
            val = data.split.val.len(),
            "loading and preprocessing"
        );
        let train_cases = data.load(&data.split.train)?;
        let val_cases = data.load(&data.split.val)?;
        check_patch_fits(config.patch, &train_cases)?;
        check_patch_fits(config.patch, &val_cases)?;
        let volumes = Arc::new(sampling_volumes(config, train_cases)?);
        let vars = VarMap::new();
        let network =
            card.model
                .build(seeded_var_builder(&vars, config.seed, DType::F32, &device))?;
        let mut optimizer = Optimizer::for_varmap(config.optimizer, &vars)?;
        let state = match last {
            Some(last) => last.restore(dir, &vars, &mut optimizer, config, extended)?,
            None => RunState::default(),
        };
        // only now that everything loaded: a refused resume leaves train.toml as it was
        if rank0 {
            record_run(dir, config, &card, &data.split, options.resume)?;
        }
        let mut scaler = config.loss_scaling.scaler(cwseg_models::precision());
        if let (Some(scaler), Some(saved)) = (&mut scaler, state.loss_scaler) {
            scaler.restore(saved);
        }
        distributed::broadcast_variables(&*comm, &vars)?;
        let metrics = rank0.then(|| open_metrics(dir)).transpose()?;
        let mut loader = loader_config(config);
        loader.parts = BatchParts::of_rank(config.batch_parts, comm.rank(), comm.size());
        Ok(Trainer {
            config: config.clone(),
            dir: dir.to_path_buf(),
            device,
            classes: card.classes.len(),
            val_cases,
            volumes,
            loader,
            card,
            vars,
            network,
            optimizer,
            scaler,
            loss: config.loss.build(),
            state,
            metrics,
            comm,
        })
    }

    /// The run's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network being trained.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The model card its checkpoints carry.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    /// Where the run stands.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    /// One optimizer step on `batch`; returns its loss. A non-finite loss is an error and
    /// changes nothing (the last good checkpoint stays in `last/`). With loss scaling, a step
    /// whose gradients are not finite is skipped and the scale backs off
    /// ([`crate::optim::LossScaler`]).
    pub fn step(&mut self, batch: &Batch) -> Result<f64> {
        let (image, labels) = batch.to_tensors(&self.device)?;
        let mut target = Target::new(labels)?;
        if let Some(contour) = batch.contour_tensor(&self.device)? {
            target = target.with_edges(contour);
        }
        if let Some(weights) = batch.weights_tensor(&self.device)? {
            target = target.with_dwce_weights(weights);
        }
        let logits = self.network.forward_t(&image, true)?;
        let value = self.loss.forward(&logits, &target)?;
        let scalar = value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // every rank sees the mean loss, so a non-finite one stops them all
        let scalar = distributed::mean(&*self.comm, scalar)?;
        if !scalar.is_finite() {
            let last = self.dir.join("last");
            let kept = if last.join("model.safetensors").exists() {
                format!("the last good checkpoint is in {}", last.display())
            } else {
                "no checkpoint had been saved yet".to_string()
            };
            bail!(
                "the loss is {scalar} at epoch {} batch {} (step {}); stopped without saving this step; {kept}",
                self.state.epoch + 1,
                self.state.batch + 1,
                self.optimizer.steps() + 1,
            );
        }
        let mut grads = match &self.scaler {
            Some(scaler) => scaler.scale_loss(&value)?.backward()?,
            None => value.backward()?,
        };
        if self.comm.size() > 1 {
            distributed::average_gradients(&*self.comm, self.optimizer.vars(), &mut grads)?;
            distributed::broadcast_buffers(&*self.comm, &self.vars)?;
        }
        self.apply(&mut grads)?;
        self.state.batch += 1;
        self.state.loss_sum += scalar;
        Ok(scalar)
    }

    /// The optimizer step from `grads`; with loss scaling, first unscaled, and skipped (counted
    /// in the run state) when they are not finite. Every rank holds the same averaged
    /// gradients, so every rank skips the same steps.
    fn apply(&mut self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        let Some(scaler) = &mut self.scaler else {
            return self.optimizer.step(grads);
        };
        if !scaler.step(&mut self.optimizer, grads)? {
            self.state.skipped_steps += 1;
            tracing::warn!(
                scale = scaler.scale(),
                "non-finite gradient: step skipped, loss scale backed off"
            );
        }
        self.state.loss_scaler = Some(scaler.state());
        Ok(())
    }

    /// Mean foreground DSC and per-class DSC of the validation cases (`None` without any);
    /// with several ranks each predicts every `size`-th case and the table is reduced.
    pub fn validate(&self) -> Result<Option<(f64, Vec<f64>)>> {
        if self.val_cases.is_empty() {
            return Ok(None);
        }
        let (rank, size, k) = (self.comm.rank(), self.comm.size(), self.classes);
        let mut table = vec![0.0f64; self.val_cases.len() * k];
        for (i, case) in self.val_cases.iter().enumerate() {
            if i % size == rank {
                let dice = case_dice(
                    &self.network,
                    case,
                    k,
                    self.config.patch,
                    self.config.validation.overlap,
                    &self.device,
                )?;
                table[i * k..(i + 1) * k].copy_from_slice(&dice);
            }
        }
        self.comm.all_reduce_sum_f64(&mut table)?;
        let per_case: Vec<Vec<f64>> = table.chunks(k).map(<[f64]>::to_vec).collect();
        Ok(Some(mean_foreground(&per_case)))
    }

    fn is_rank0(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Writes `last/` (weights, card, optimizer and run state) as a whole (rank 0; the other
    /// ranks hold the same).
    pub fn save_last(&self) -> Result<()> {
        if !self.is_rank0() {
            return Ok(());
        }
        save_checkpoint(
            &self.dir.join("last"),
            &self.vars,
            &self.card,
            Some(Resumable {
                optimizer: &self.optimizer,
                state: &self.state,
                config: &recorded_config(&self.config, &self.card),
            }),
        )
    }

    /// The batches left in the current epoch, each one optimizer step; `false` when a hook
    /// stopped the epoch before its end.
    fn train_epoch(&mut self, lr: f64, hooks: &mut dyn TrainHooks) -> Result<bool> {
        let epoch_start = Instant::now();
        let first = self.state.batch;
        let loader = EpochLoader::starting_at(
            Arc::clone(&self.volumes),
            self.loader,
            self.config.seed,
            self.state.epoch as u64,
            first,
        );
        for batch in loader {
            let loss = self.step(&batch?)?;
            let patches = (self.state.batch - first) * self.config.batch_size;
            hooks.step(&StepReport {
                epoch: self.state.epoch,
                epochs: self.config.epochs,
                batch: self.state.batch,
                loss,
                mean_loss: self.state.loss_sum / self.state.batch as f64,
                lr,
                patches_per_second: patches as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9),
                best_dice: self.state.best_dice,
            });
            if distributed::any(&*self.comm, hooks.should_stop())? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// After the last batch of an epoch: validation when due, `best/` when it improved, the
    /// `metrics.jsonl` line, the run state and `last/`.
    fn end_epoch(&mut self, lr: f64, first_batch: usize, seconds: f64) -> Result<EpochReport> {
        let epoch = self.state.epoch;
        let last_epoch = epoch + 1 == self.config.epochs;
        let due = (epoch + 1).is_multiple_of(self.config.validation.every.max(1)) || last_epoch;
        let validation = if due { self.validate()? } else { None };
        let (val_dice, per_class) = validation.unzip();
        let improved = match (val_dice, self.state.best_dice) {
            (Some(d), Some(b)) => d.is_finite() && d > b,
            (Some(d), None) => d.is_finite(),
            (None, _) => self.val_cases.is_empty() && last_epoch,
        };
        distributed::check_replicas(&*self.comm, &self.vars)?;
        if improved {
            self.state.best_dice = val_dice;
            self.state.best_epoch = Some(epoch + 1);
            if self.is_rank0() {
                save_checkpoint(&self.dir.join("best"), &self.vars, &self.card, None)?;
            }
        }
        let patches = (self.config.batches_per_epoch - first_batch) * self.config.batch_size;
        let report = EpochReport {
            epoch: epoch + 1,
            loss: self.state.loss_sum / self.state.batch.max(1) as f64,
            lr,
            val_dice,
            val_dice_per_class: per_class,
            seconds,
            patches_per_second: patches as f64 / seconds.max(1e-9),
            improved,
            stalled: false,
        };
        let finite = |d: f64| d.is_finite().then_some(d);
        let mut line = json!({
            "epoch": report.epoch,
            "loss": report.loss,
            "lr": lr,
            "val_dice": report.val_dice.and_then(finite),
            "val_dice_per_class": report.val_dice_per_class.as_ref().map(|v| v.iter().map(|&d| finite(d)).collect::<Vec<_>>()),
            "seconds": seconds,
            "patches_per_second": report.patches_per_second,
        });
        if let Some(scaler) = &self.scaler {
            line["loss_scale"] = json!(scaler.scale());
            line["skipped_steps"] = json!(self.state.skipped_steps);
        }
        if let Some(metrics) = &mut self.metrics {
            writeln!(metrics, "{line}").context("writing metrics.jsonl")?;
        }
        self.state.epoch += 1;
        self.state.batch = 0;
        self.state.loss_sum = 0.0;
        let stalled = self
            .config
            .validation
            .patience
            .zip(self.state.best_epoch)
            .is_some_and(|(patience, best)| self.state.epoch >= best + patience);
        self.state.finished = self.state.epoch == self.config.epochs || stalled;
        self.save_last()?;
        tracing::info!(epoch = epoch + 1, loss = report.loss, val_dice = %show_dice(val_dice), "epoch done");
        if stalled {
            tracing::info!(
                best_epoch = self.state.best_epoch.unwrap_or_default(),
                "validation DSC has not improved for {} epochs; stopped early",
                self.config.validation.patience.unwrap_or_default()
            );
        }
        Ok(EpochReport { stalled, ..report })
    }

    /// Trains the remaining epochs; at the end decides the post-processing on the validation
    /// cases (recorded in `best/config.json`) and writes `curves.png`. A hook that stops the
    /// run leaves `last/` to resume from and an outcome with `interrupted` set.
    pub fn run(mut self, hooks: &mut dyn TrainHooks) -> Result<TrainOutcome> {
        let start = Instant::now();
        let per_epoch = self.config.batches_per_epoch as u64;
        hooks.started(&RunStart {
            name: format!("{} {}", self.card.model.name(), self.loss.name()),
            total_steps: self.config.epochs as u64 * per_epoch,
            done_steps: self.state.epoch as u64 * per_epoch + self.state.batch as u64,
        });
        if self.state.finished {
            tracing::info!("the run had finished; nothing to do");
        }
        let mut interrupted = false;
        while self.state.epoch < self.config.epochs && !self.state.finished {
            let lr = self.config.schedule.lr(
                self.config.optimizer.lr,
                self.state.epoch,
                self.config.epochs,
            );
            self.optimizer.set_lr(lr);
            let epoch_start = Instant::now();
            let first = self.state.batch;
            if !self.train_epoch(lr, hooks)? {
                self.save_last()?;
                interrupted = true;
                break;
            }
            let report = self.end_epoch(lr, first, epoch_start.elapsed().as_secs_f64())?;
            hooks.epoch(&report);
        }
        if !interrupted && self.is_rank0() {
            decide_postprocessing(&self.dir, &self.val_cases, &self.config, &self.device)?;
            crate::figures::write_curves(
                &self.dir.join("metrics.jsonl"),
                &self.dir.join("curves.png"),
            )?;
        }
        let outcome = TrainOutcome {
            dir: self.dir.clone(),
            best_dice: self.state.best_dice,
            interrupted,
            seconds: start.elapsed().as_secs_f64(),
        };
        hooks.finished(&outcome, &self.state);
        Ok(outcome)
    }
}

/// A run's last checkpoint (`RUN/last/`) whose files match the digests recorded in it.
struct LastCheckpoint {
    /// The folder.
    dir: PathBuf,
    /// Its model card (`config.json`).
    card: ModelCard,
    /// Its run state (`state.json`).
    state: RunState,
}

/// Reads `dir/last/`: its card and run state, with the weights and the optimizer state checked
/// against the SHA-256 that the card and the run state record (checkpoints written before a
/// digest was recorded are not checked). Loads nothing into a network.
fn read_last(dir: &Path) -> Result<LastCheckpoint> {
    let last = dir.join("last");
    let card = ModelCard::read(&last)?;
    card.verify_weights(&last)?;
    let path = last.join("state.json");
    let state: RunState = serde_json::from_str(
        &fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not a run state", path.display()))?;
    check_best_present(dir, &state, &path)?;
    if let Some(expected) = &state.optimizer_sha256 {
        let optimizer = last.join("optimizer.safetensors");
        let found = crate::card::sha256_file(&optimizer)?;
        if &found != expected {
            bail!(
                "{}: SHA-256 {found} is not the {expected} recorded in {} (a damaged or replaced optimizer state)",
                optimizer.display(),
                path.display()
            );
        }
    }
    Ok(LastCheckpoint {
        dir: last,
        card,
        state,
    })
}

/// A validation DSC for the log: the number, or `-` for an epoch without validation.
fn show_dice(dice: Option<f64>) -> String {
    dice.map_or_else(|| "-".to_string(), |d| d.to_string())
}

/// Refuses to resume a run whose state (`state_path`) records a best epoch when `best/` lacks
/// a file that the end of training reads (its card and weights), naming the missing file:
/// otherwise the run would train on and fail only at the end.
fn check_best_present(dir: &Path, state: &RunState, state_path: &Path) -> Result<()> {
    let Some(epoch) = state.best_epoch else {
        return Ok(());
    };
    let best = dir.join("best");
    for file in ["config.json", "model.safetensors"] {
        let path = best.join(file);
        if !path.is_file() {
            bail!(
                "{} is missing, but {} records a best checkpoint (epoch {}); restore it, or train into a new folder",
                path.display(),
                state_path.display(),
                epoch
            );
        }
    }
    Ok(())
}

impl LastCheckpoint {
    /// Refuses to resume with `card` (this invocation's configuration on this data) where it
    /// differs from the checkpoint's in what cannot change within a run: the network, the loss,
    /// the patch, the preprocessing, the contour maps, the classes, their label values or the
    /// modalities; the error names them.
    fn check_card(&self, card: &ModelCard) -> Result<()> {
        use serde_json::to_value as value;
        let fields = |c: &ModelCard| -> Result<[(&'static str, serde_json::Value); 8]> {
            Ok([
                ("model", value(&c.model)?),
                ("loss", value(&c.loss)?),
                ("patch", value(c.patch)?),
                ("preprocessing", value(c.preprocessing)?),
                ("contour_maps", value(c.contour_maps)?),
                ("classes", value(&c.classes)?),
                ("label_values", value(&c.label_values)?),
                ("modalities", value(&c.modalities)?),
            ])
        };
        let (saved, given) = (fields(&self.card)?, fields(card)?);
        let differing: Vec<&str> = saved
            .iter()
            .zip(&given)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, _)| a.0)
            .collect();
        if !differing.is_empty() {
            bail!(
                "--resume: the {} of this configuration and data differ(s) from {}, what the checkpoint was trained with; resume with the run's own train.toml and data, or train into a new folder",
                differing.join(", "),
                self.dir.join("config.json").display()
            );
        }
        Ok(())
    }

    /// Loads the weights and the optimizer state into `vars` and `optimizer`, checks the run
    /// state against the optimizer's step count and cuts `run/metrics.jsonl` back to the saved
    /// epochs; a finished run given more epochs (`extended`) continues.
    fn restore(
        self,
        run: &Path,
        vars: &VarMap,
        optimizer: &mut Optimizer,
        config: &TrainConfig,
        extended: bool,
    ) -> Result<RunState> {
        weights::load_strict(vars, self.dir.join("model.safetensors"))?;
        optimizer.load(&self.dir.join("optimizer.safetensors"))?;
        let mut state = self.state;
        check_state(
            &self.dir.join("state.json"),
            &state,
            config,
            optimizer.steps(),
        )?;
        truncate_metrics(&run.join("metrics.jsonl"), state.epoch)?;
        if state.finished && extended && state.epoch < config.epochs {
            state.finished = false;
        }
        Ok(state)
    }
}
