//! The training loop: patches from the loader, any network, any loss, validation by
//! sliding-window inference each epoch, best and last checkpoints, exact resumption, a
//! progress bar, `metrics.jsonl`, and clean stops on Ctrl-C or a non-finite loss.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, ModuleT};
use candle_nn::VarMap;
use cwseg_data::{
    AugmentConfig, EpochLoader, LoaderConfig, PatchMaps, SamplerConfig, SamplingVolume, argmax,
};
use cwseg_losses::{LossConfig, Target};
use cwseg_models::{ModelConfig, Network, seeded_var_builder, weights};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::infer::{SlidingWindow, predict_probabilities};
use crate::optim::{Optimizer, OptimizerConfig, Schedule};
use crate::postprocess::{self, PostProcessing};
use crate::prepare::{DataConfig, PreparedCase, Preprocessing, open_data};

/// Validation settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate every this many epochs (and after the last).
    pub every: usize,
    /// Sliding-window overlap.
    pub overlap: f64,
    /// Decide the post-processing on the validation cases after training (SPEC §6).
    pub postprocess: bool,
    /// Stop when the validation DSC has not improved for this many epochs (early stopping;
    /// `None`: train every epoch).
    pub patience: Option<usize>,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            every: 1,
            overlap: 0.5,
            postprocess: true,
            patience: None,
        }
    }
}

/// Where a training patch's contour map comes from (SPEC §1, "training on patches").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContourMaps {
    /// The whole volume's map cropped with the patch, as the paper's code makes its maps
    /// offline: the loader cuts each patch with a halo of the element's reach, augments it,
    /// makes the map and crops it, so the loss's border rule applies only at the volume's
    /// edges. DWCE weights are made once per case on the whole volume and cropped.
    #[default]
    Volume,
    /// The map of the patch alone (cwseg v1): the loss's border rule applies at every patch
    /// face, and DWCE weights are made per patch.
    Patch,
}

impl ContourMaps {
    /// What a model card written before the rule was recorded was trained with.
    fn legacy() -> Self {
        ContourMaps::Patch
    }
}

/// Everything a training run needs; `cwseg train --config run.toml` reads it, flags override.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The data.
    pub data: DataConfig,
    /// The network (`in_channels` and `classes` are set from the data).
    pub model: ModelConfig,
    /// The loss.
    pub loss: LossConfig,
    /// Patch size `[z, y, x]` (also the inference window).
    pub patch: [usize; 3],
    /// Patches per batch.
    pub batch_size: usize,
    /// Epochs.
    pub epochs: usize,
    /// Batches per epoch.
    pub batches_per_epoch: usize,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Seed of everything random (weights, split, patches, augmentation).
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Augmentation.
    pub augment: AugmentConfig,
    /// Weight of patches centred on foreground.
    pub positive: f64,
    /// Weight of patches centred anywhere.
    pub negative: f64,
    /// Loader threads.
    pub workers: usize,
    /// Validation.
    pub validation: ValidationConfig,
    /// Where the contour maps (and DWCE weights) of patches come from.
    pub contour_maps: ContourMaps,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: DataConfig::default(),
            model: ModelConfig::Unet(cwseg_models::UNetConfig::default()),
            loss: LossConfig::Cwcd(Default::default()),
            patch: [32, 32, 32],
            batch_size: 2,
            epochs: 10,
            batches_per_epoch: 20,
            optimizer: OptimizerConfig::default(),
            schedule: Schedule::default(),
            seed: 0,
            device: "cpu".into(),
            augment: AugmentConfig::default(),
            positive: 2.0,
            negative: 1.0,
            workers: 2,
            validation: ValidationConfig::default(),
            contour_maps: ContourMaps::default(),
        }
    }
}

impl TrainConfig {
    /// Refuses a configuration that would train something meaningless, naming the field:
    /// sizes and counts positive, every rate, weight and probability finite and in its range,
    /// the loss's numbers ([`LossConfig::validate`]), the phantom's size.
    pub fn validate(&self) -> Result<()> {
        let mut bad: Vec<String> = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                bad.push(what);
            }
        };
        let o = &self.optimizer;
        check(
            o.lr.is_finite() && o.lr > 0.0,
            format!("optimizer.lr = {} (finite, > 0)", o.lr),
        );
        check(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            format!("optimizer.weight_decay = {} (finite, ≥ 0)", o.weight_decay),
        );
        check(
            o.betas.iter().all(|b| (0.0..1.0).contains(b)),
            format!("optimizer.betas = {:?} (each in [0, 1))", o.betas),
        );
        check(
            o.eps.is_finite() && o.eps > 0.0,
            format!("optimizer.eps = {} (finite, > 0)", o.eps),
        );
        check(
            (0.0..1.0).contains(&o.momentum),
            format!("optimizer.momentum = {} (in [0, 1))", o.momentum),
        );
        match &self.schedule {
            Schedule::Step { gamma, .. } => check(
                gamma.is_finite() && *gamma > 0.0,
                format!("schedule.gamma = {gamma} (finite, > 0)"),
            ),
            Schedule::Cosine { min_lr } => check(
                min_lr.is_finite() && *min_lr >= 0.0,
                format!("schedule.min_lr = {min_lr} (finite, ≥ 0)"),
            ),
            Schedule::Poly { power } => check(
                power.is_finite() && *power > 0.0,
                format!("schedule.power = {power} (finite, > 0)"),
            ),
            Schedule::Constant => {}
        }
        for (name, w) in [("positive", self.positive), ("negative", self.negative)] {
            check(
                w.is_finite() && w >= 0.0,
                format!("{name} = {w} (finite, ≥ 0)"),
            );
        }
        check(
            self.positive + self.negative > 0.0,
            "positive + negative must be > 0".into(),
        );
        let a = &self.augment;
        for (name, p) in [
            ("rotation_probability", a.rotation_probability),
            ("flip_probability", a.flip_probability),
            ("scale_probability", a.scale_probability),
            ("intensity_probability", a.intensity_probability),
        ] {
            check(
                (0.0..=1.0).contains(&p),
                format!("augment.{name} = {p} (in [0, 1])"),
            );
        }
        for (name, v) in [
            ("max_rotation_degrees", a.max_rotation_degrees),
            ("intensity_scale", a.intensity_scale),
            ("intensity_shift", a.intensity_shift),
        ] {
            check(
                v.is_finite() && v >= 0.0,
                format!("augment.{name} = {v} (finite, ≥ 0)"),
            );
        }
        check(
            a.scale_range.iter().all(|z| z.is_finite() && *z > 0.0)
                && a.scale_range[0] <= a.scale_range[1],
            format!("augment.scale_range = {:?} (0 < low ≤ high)", a.scale_range),
        );
        if let Some(Err(e)) = self.data.preprocessing.map(|p| p.normalization.validate()) {
            check(false, format!("data.preprocessing: {e}"));
        }
        check(
            (0.0..1.0).contains(&self.validation.overlap),
            format!(
                "validation.overlap = {} (in [0, 1))",
                self.validation.overlap
            ),
        );
        check(
            self.validation.every >= 1,
            "validation.every must be ≥ 1".into(),
        );
        check(
            self.batch_size > 0
                && self.epochs > 0
                && self.batches_per_epoch > 0
                && !self.patch.contains(&0),
            "batch size, epochs, batches per epoch and patch size must be positive".into(),
        );
        let multiple = self.model.size_multiple();
        check(
            self.patch.iter().all(|p| p % multiple == 0),
            format!(
                "patch {:?}: every side must be a multiple of {multiple} for this network",
                self.patch
            ),
        );
        check(
            !(self.model.uses_batch_norm()
                && self.batch_size == 1
                && self.patch.iter().all(|p| p / multiple == 1)),
            format!(
                "batch 1 with patch {:?}: the deepest level's batch norm would see one value per channel; use a batch of at least 2, a larger patch, or instance/group norm",
                self.patch
            ),
        );
        if let Some(first) = bad.first() {
            bail!("invalid training configuration: {first}");
        }
        self.loss.validate()?;
        if self.data.source == "synthetic" {
            self.data.synthetic.phantom.validate()?;
        }
        Ok(())
    }
}

/// What `predict` needs from a run: written as `config.json` beside every `model.safetensors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The cwseg version that wrote it.
    pub cwseg_version: String,
    /// The network.
    pub model: ModelConfig,
    /// The loss it was trained with (`None`: trained outside cwseg, see `origin`).
    pub loss: Option<LossConfig>,
    /// Class names, index = class.
    pub classes: Vec<String>,
    /// Stored label value of each class (written back by `predict`).
    pub label_values: Vec<u8>,
    /// Input channels, in order.
    pub modalities: Vec<String>,
    /// Preprocessing to replay.
    pub preprocessing: Preprocessing,
    /// Inference window.
    pub patch: [usize; 3],
    /// Inference overlap.
    pub overlap: f64,
    /// What overlapping windows blend (cards before this field: probabilities).
    #[serde(default)]
    pub blend: crate::infer::Blend,
    /// The window weights (cards before this field: Gaussian).
    #[serde(default)]
    pub window_weights: crate::infer::WindowWeights,
    /// Where the training patches' contour maps came from (cards written before this field
    /// existed were trained with per-patch maps).
    #[serde(default = "ContourMaps::legacy")]
    pub contour_maps: ContourMaps,
    /// What prediction does after the argmax, decided on the validation cases after training
    /// (`None`: not decided, or no validation cases).
    #[serde(default)]
    pub postprocessing: Option<PostProcessing>,
    /// SHA-256 of the `model.safetensors` beside it (hex); loading refuses a file that differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
    /// Where weights trained elsewhere came from and how they were converted (`cwseg import`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

impl ModelCard {
    /// The card's sliding-window settings with `overlap`.
    pub fn sliding_window(&self, overlap: f64) -> crate::infer::SlidingWindow {
        crate::infer::SlidingWindow {
            overlap,
            blend: self.blend,
            weights: self.window_weights,
        }
    }

    /// The card with the digest of the weights file `weights`.
    pub fn with_weights_digest(&self, weights: &Path) -> Result<ModelCard> {
        Ok(ModelCard {
            weights_sha256: Some(sha256_file(weights)?),
            ..self.clone()
        })
    }

    /// Refuses a `dir/model.safetensors` whose SHA-256 is not the card's (when it has one).
    pub fn verify_weights(&self, dir: &Path) -> Result<()> {
        let Some(expected) = &self.weights_sha256 else {
            return Ok(());
        };
        let path = dir.join("model.safetensors");
        let found = sha256_file(&path)?;
        if &found != expected {
            bail!(
                "{}: SHA-256 {found} is not the {expected} recorded in {} (a damaged or replaced weights file)",
                path.display(),
                dir.join("config.json").display()
            );
        }
        Ok(())
    }

    /// Reads `dir/config.json`.
    pub fn read(dir: &Path) -> Result<ModelCard> {
        let path = dir.join("config.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        ModelCard::parse(&text, &path)
    }

    /// A model card from the text of a `config.json` (`path` names it in errors): the JSON,
    /// then a normalisation that is valid and measured.
    pub fn parse(text: &str, path: &Path) -> Result<ModelCard> {
        let card: ModelCard = serde_json::from_str(text)
            .with_context(|| format!("{}: not a cwseg model config", path.display()))?;
        let normalization = card.preprocessing.normalization;
        normalization
            .validate()
            .with_context(|| format!("{}: preprocessing", path.display()))?;
        if normalization.needs_dataset_statistics() {
            bail!(
                "{}: preprocessing normalization nnunet_ct has no statistics; a trained model \
                 records clip_z_score with the training set's numbers",
                path.display()
            );
        }
        Ok(card)
    }
}

/// Progress state saved with the last checkpoint.
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

/// Parses `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        other if other == "cuda" || other.starts_with("cuda:") => {
            let ordinal: usize = other
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()
                .with_context(|| format!("device `{other}`: expected cuda:N"))?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                bail!(
                    "device `{other}`: this cwseg was built without CUDA; build it with `scripts/build-cuda.sh` (see the README's GPU section)"
                );
            }
            Device::new_cuda(ordinal).map_err(|e| {
                // candle may append a backtrace: the first line is the driver's answer
                let cause = e.to_string();
                let cause = cause.lines().next().unwrap_or_default().trim();
                anyhow::anyhow!("device `{other}`: no usable CUDA GPU ({cause})")
            })
        }
        other => bail!("unknown device `{other}`: use cpu, cuda or cuda:N"),
    }
}

/// Set by Ctrl-C (SIGINT) or SIGTERM; the loop stops after the current step and saves.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Set by SIGTERM: the command exits with 143 instead of 130.
pub static TERMINATED: AtomicBool = AtomicBool::new(false);

/// Whether a training loop is running, which stops cleanly on the first Ctrl-C (elsewhere the
/// first Ctrl-C ends the command at once).
pub static TRAINING: AtomicBool = AtomicBool::new(false);

/// A run stopped by Ctrl-C or SIGTERM after saving what can be resumed: the command exits
/// with 130 or 143, as a shell reports those signals.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Sets [`TRAINING`] for as long as it lives.
struct TrainingGuard;

impl TrainingGuard {
    fn new() -> Self {
        TRAINING.store(true, Ordering::SeqCst);
        TrainingGuard
    }
}

impl Drop for TrainingGuard {
    fn drop(&mut self) {
        TRAINING.store(false, Ordering::SeqCst);
    }
}

/// Per-class DSC of a prediction (NaN where the class is in neither).
pub fn dice_per_class(
    prediction: &ndarray::Array3<u8>,
    label: &ndarray::Array3<u8>,
    classes: usize,
) -> Vec<f64> {
    let mut inter = vec![0u64; classes];
    let mut p = vec![0u64; classes];
    let mut g = vec![0u64; classes];
    for (&a, &b) in prediction.iter().zip(label.iter()) {
        p[a as usize % classes] += 1;
        g[b as usize % classes] += 1;
        if a == b {
            inter[a as usize % classes] += 1;
        }
    }
    (0..classes)
        .map(|k| {
            if p[k] + g[k] == 0 {
                f64::NAN
            } else {
                2.0 * inter[k] as f64 / (p[k] + g[k]) as f64
            }
        })
        .collect()
}

/// Mean over foreground classes of the mean over cases, NaN-skipping.
fn mean_foreground(per_case: &[Vec<f64>]) -> (f64, Vec<f64>) {
    let classes = per_case.first().map_or(0, Vec::len);
    let per_class: Vec<f64> = (1..classes)
        .map(|k| {
            let v: Vec<f64> = per_case
                .iter()
                .map(|c| c[k])
                .filter(|d| d.is_finite())
                .collect();
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        })
        .collect();
    let valid: Vec<f64> = per_class
        .iter()
        .copied()
        .filter(|d| d.is_finite())
        .collect();
    let mean = if valid.is_empty() {
        f64::NAN
    } else {
        valid.iter().sum::<f64>() / valid.len() as f64
    };
    (mean, per_class)
}

/// Validation: sliding-window predictions of `cases`, their per-class DSC.
pub fn validate(
    network: &Network,
    cases: &[PreparedCase],
    classes: usize,
    patch: [usize; 3],
    overlap: f64,
    device: &Device,
) -> Result<(f64, Vec<f64>)> {
    let mut per_case = Vec::new();
    for case in cases {
        let probs = predict_probabilities(
            network,
            &case.image.data,
            classes,
            patch,
            SlidingWindow::probabilities(overlap),
            2,
            device,
        )?;
        per_case.push(dice_per_class(
            &argmax(probs.view()),
            &case.label.data,
            classes,
        ));
    }
    Ok(mean_foreground(&per_case))
}

/// Writes the checkpoint folder `dir` (weights, card, and with `optimizer` its state and the
/// run state) as a whole ([`crate::checkpoint::replace`]).
fn save_checkpoint(
    dir: &Path,
    vars: &VarMap,
    card: &ModelCard,
    optimizer: Option<(&Optimizer, &RunState)>,
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
        if let Some((opt, state)) = optimizer {
            opt.save(&tmp.join("optimizer.safetensors"))?;
            cwseg_data::dataset::write_atomic(
                &tmp.join("state.json"),
                serde_json::to_string_pretty(state)?.as_bytes(),
            )?;
        }
        Ok(())
    })
}

/// Refuses a run state that disagrees with the optimizer saved beside it: every batch is one
/// optimizer step, so `epoch · batches_per_epoch + batch` must equal the saved step count (an
/// edited `state.json` would otherwise skip or repeat epochs silently).
fn check_state(path: &Path, state: &RunState, config: &TrainConfig, steps: u64) -> Result<()> {
    let expected = (state.epoch as u64)
        .checked_mul(config.batches_per_epoch as u64)
        .and_then(|s| s.checked_add(state.batch as u64));
    if state.batch > config.batches_per_epoch || expected != Some(steps) {
        bail!(
            "{}: epoch {} batch {} of {} batches per epoch disagrees with the {steps} steps of \
             optimizer.safetensors beside it; the checkpoint was edited or mixed from two runs \
             (restore it, or train into a new folder)",
            path.display(),
            state.epoch,
            state.batch,
            config.batches_per_epoch
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

/// The configuration a run folder was trained with (`RUN/train.toml`).
pub fn read_run_config(dir: &Path) -> Result<TrainConfig> {
    let path = dir.join("train.toml");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("--resume: reading {}", path.display()))?;
    toml::from_str(&text)
        .with_context(|| format!("{}: not a training configuration", path.display()))
}

/// The dotted names of the fields in which `given` differs from `saved`, leaving out those a
/// resumed run may change: `epochs` (checked apart), `device` and `workers`.
fn differing_fields(saved: &TrainConfig, given: &TrainConfig) -> Result<Vec<String>> {
    fn walk(a: &toml::Value, b: &toml::Value, path: &str, out: &mut Vec<String>) {
        match (a, b) {
            (toml::Value::Table(x), toml::Value::Table(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for key in keys {
                    let name = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    match (x.get(key), y.get(key)) {
                        (Some(u), Some(v)) => walk(u, v, &name, out),
                        _ => out.push(name),
                    }
                }
            }
            _ if a != b => out.push(path.to_string()),
            _ => {}
        }
    }
    // the network's channels, classes and UNETR's input size come from the data and the patch:
    // train.toml records the run's, a configuration given beside --resume may hold defaults
    let derived_cleared = |c: &TrainConfig| TrainConfig {
        model: c.model.with_io(0, 0).with_input_size(c.patch),
        ..c.clone()
    };
    let mut out = Vec::new();
    walk(
        &toml::Value::try_from(derived_cleared(saved))?,
        &toml::Value::try_from(derived_cleared(given))?,
        "",
        &mut out,
    );
    out.retain(|f| !matches!(f.as_str(), "epochs" | "device" | "workers"));
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
    /// Continue the run in the folder from its last checkpoint.
    pub resume: bool,
    /// No progress bar.
    pub quiet: bool,
    /// Where the synthetic data set is written (default `RUN/data`).
    pub data_dir: Option<PathBuf>,
}

/// Trains `config` into `dir`. A folder this call created is removed again when the run fails
/// before its first checkpoint (nothing to resume).
pub fn train(config: &TrainConfig, dir: &Path, options: RunOptions) -> Result<TrainOutcome> {
    config.validate()?;
    let created = !dir.exists();
    let outcome = train_in(config, dir, options);
    if outcome.is_err() && created && !dir.join("last").exists() {
        let _ = fs::remove_dir_all(dir);
    }
    outcome
}

fn train_in(config: &TrainConfig, dir: &Path, options: RunOptions) -> Result<TrainOutcome> {
    let start = Instant::now();
    fs::create_dir_all(dir)
        .with_context(|| format!("creating the run folder {}", dir.display()))?;
    let saved_config = dir.join("train.toml");
    let mut extended = false;
    for checkpoint in ["last", "best"] {
        crate::checkpoint::recover(&dir.join(checkpoint))?;
    }
    if options.resume {
        let saved = read_run_config(dir)?;
        let differing = differing_fields(&saved, config)?;
        if !differing.is_empty() {
            bail!(
                "--resume: {} differ(s) from the run's {}; resume with the run's settings (only a larger --epochs extends it)",
                differing.join(", "),
                saved_config.display()
            );
        }
        if config.epochs < saved.epochs {
            bail!(
                "--resume: --epochs {} is fewer than the run's {}; a run can be extended, not shortened",
                config.epochs,
                saved.epochs
            );
        }
        extended = config.epochs > saved.epochs;
    } else if dir.join("last").exists() {
        bail!(
            "{} already holds a run; use --resume to continue it or choose another --out",
            dir.display()
        );
    }
    let device = parse_device(&config.device)?;
    let data_dir = options.data_dir.clone().unwrap_or_else(|| dir.join("data"));
    let mut data = open_data(&config.data, config.seed, &data_dir)?;
    data.preprocessing = data
        .preprocessing
        .measure(&data.dataset, &data.split.train)?;
    let classes = data.dataset.classes.len();
    let model_config = config
        .model
        .with_io(data.dataset.modalities.len(), classes)
        .with_input_size(config.patch);
    let multiple = model_config.size_multiple();
    if config.patch.iter().any(|p| p % multiple != 0) {
        bail!(
            "patch {:?}: every side must be a multiple of {multiple} for this network",
            config.patch
        );
    }

    data.split.write(dir.join("split.json"))?;
    // the run's own network (channels and classes from the data), not the configuration's defaults
    let recorded = TrainConfig {
        model: model_config.clone(),
        ..config.clone()
    };
    cwseg_data::dataset::write_atomic(
        &saved_config,
        toml::to_string_pretty(&recorded)?.as_bytes(),
    )?;
    tracing::info!(
        cases = data.split.train.len(),
        val = data.split.val.len(),
        "loading and preprocessing"
    );
    let train_cases = data.load(&data.split.train)?;
    let val_cases = data.load(&data.split.val)?;
    for case in train_cases.iter().chain(&val_cases) {
        let shape = case.image.geometry.shape();
        if (0..3).any(|a| config.patch[a] > shape[a]) {
            bail!(
                "patch {:?} is larger than case {} after preprocessing {:?}: choose a patch no larger than the smallest case (or resample to a finer spacing)",
                config.patch,
                case.id,
                shape
            );
        }
    }
    let volumes = Arc::new(sampling_volumes(config, train_cases)?);
    let card = ModelCard {
        cwseg_version: env!("CARGO_PKG_VERSION").to_string(),
        model: model_config.clone(),
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
        origin: None,
    };

    let vars = VarMap::new();
    let network =
        model_config.build(seeded_var_builder(&vars, config.seed, DType::F32, &device))?;
    let mut optimizer = Optimizer::for_varmap(config.optimizer, &vars)?;
    let loss = config.loss.build();
    let mut state = RunState::default();
    if options.resume {
        let last = dir.join("last");
        weights::load_strict(&vars, last.join("model.safetensors"))?;
        optimizer.load(&last.join("optimizer.safetensors"))?;
        let path = last.join("state.json");
        state = serde_json::from_str(
            &fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{}: not a run state", path.display()))?;
        check_state(&path, &state, config, optimizer.steps())?;
        truncate_metrics(&dir.join("metrics.jsonl"), state.epoch)?;
        if state.finished && extended && state.epoch < config.epochs {
            // a larger --epochs continues a finished run
            state.finished = false;
        }
        if state.finished {
            decide_postprocessing(dir, &val_cases, config, &device)?;
            tracing::info!("the run had finished; nothing to do");
            return Ok(TrainOutcome {
                dir: dir.to_path_buf(),
                best_dice: state.best_dice,
                interrupted: false,
                seconds: 0.0,
            });
        }
    }
    let loader_config = LoaderConfig {
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
    };
    let bar = if options.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((config.epochs * config.batches_per_epoch) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} {}", model_config.name(), loss.name()));
    bar.set_position((state.epoch * config.batches_per_epoch + state.batch) as u64);
    let mut metrics = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("metrics.jsonl"))
        .with_context(|| format!("opening {}", dir.join("metrics.jsonl").display()))?;
    let mut interrupted = false;
    // Test hook: behave as if Ctrl-C came after this many batches of this invocation.
    let interrupt_after: Option<usize> = std::env::var("CWSEG_INTERRUPT_AFTER_BATCHES")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut batches_run = 0usize;
    let _training = TrainingGuard::new();
    while state.epoch < config.epochs && !state.finished {
        let epoch = state.epoch;
        let lr = config
            .schedule
            .lr(config.optimizer.lr, epoch, config.epochs);
        optimizer.set_lr(lr);
        let epoch_start = Instant::now();
        let first = state.batch;
        let loader = EpochLoader::starting_at(
            Arc::clone(&volumes),
            loader_config,
            config.seed,
            epoch as u64,
            first,
        );
        for batch in loader {
            let batch = batch?;
            let (image, labels) = batch.to_tensors(&device)?;
            let mut target = Target::new(labels)?;
            if let Some(contour) = batch.contour_tensor(&device)? {
                target = target.with_edges(contour);
            }
            if let Some(weights) = batch.weights_tensor(&device)? {
                target = target.with_dwce_weights(weights);
            }
            let logits = network.forward_t(&image, true)?;
            let value = loss.forward(&logits, &target)?;
            let scalar = value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !scalar.is_finite() {
                bar.abandon();
                let last = dir.join("last");
                let kept = if last.join("model.safetensors").exists() {
                    format!("the last good checkpoint is in {}", last.display())
                } else {
                    "no checkpoint had been saved yet".to_string()
                };
                bail!(
                    "the loss is {scalar} at epoch {} batch {} (step {}); stopped without saving this step; {kept}",
                    epoch + 1,
                    state.batch + 1,
                    optimizer.steps() + 1,
                );
            }
            let grads = value.backward()?;
            optimizer.step(&grads)?;
            state.batch += 1;
            state.loss_sum += scalar;
            bar.inc(1);
            let rate = (state.batch - first) as f64 * config.batch_size as f64
                / epoch_start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "epoch {}/{} loss {:.4} lr {:.1e} {:.2} patches/s best DSC {}",
                epoch + 1,
                config.epochs,
                state.loss_sum / state.batch as f64,
                lr,
                rate,
                state.best_dice.map_or("-".into(), |d| format!("{d:.4}"))
            ));
            batches_run += 1;
            if INTERRUPTED.load(Ordering::SeqCst) || interrupt_after == Some(batches_run) {
                interrupted = true;
                break;
            }
        }
        if interrupted {
            save_checkpoint(&dir.join("last"), &vars, &card, Some((&optimizer, &state)))?;
            bar.abandon_with_message(format!(
                "interrupted at epoch {} batch {}; saved; continue with --resume",
                epoch + 1,
                state.batch
            ));
            break;
        }
        let train_loss = state.loss_sum / state.batch.max(1) as f64;
        let last_epoch = epoch + 1 == config.epochs;
        let (val_dice, per_class) = if !val_cases.is_empty()
            && ((epoch + 1) % config.validation.every.max(1) == 0 || last_epoch)
        {
            let (d, pc) = validate(
                &network,
                &val_cases,
                classes,
                config.patch,
                config.validation.overlap,
                &device,
            )?;
            (Some(d), Some(pc))
        } else {
            (None, None)
        };
        let improved = match (val_dice, state.best_dice) {
            (Some(d), Some(b)) => d.is_finite() && d > b,
            (Some(d), None) => d.is_finite(),
            (None, _) => val_cases.is_empty() && last_epoch,
        };
        if improved {
            state.best_dice = val_dice;
            state.best_epoch = Some(epoch + 1);
            save_checkpoint(&dir.join("best"), &vars, &card, None)?;
        }
        let seconds = epoch_start.elapsed().as_secs_f64();
        let line = json!({
            "epoch": epoch + 1,
            "loss": train_loss,
            "lr": lr,
            "val_dice": val_dice.filter(|d| d.is_finite()),
            "val_dice_per_class": per_class.map(|v| v.into_iter().map(|d| if d.is_finite() { Some(d) } else { None }).collect::<Vec<_>>()),
            "seconds": seconds,
            "patches_per_second": (config.batches_per_epoch - first) as f64 * config.batch_size as f64 / seconds.max(1e-9),
        });
        writeln!(metrics, "{line}").context("writing metrics.jsonl")?;
        state.epoch += 1;
        state.batch = 0;
        state.loss_sum = 0.0;
        let stalled = config
            .validation
            .patience
            .zip(state.best_epoch)
            .is_some_and(|(patience, best)| state.epoch >= best + patience);
        state.finished = state.epoch == config.epochs || stalled;
        save_checkpoint(&dir.join("last"), &vars, &card, Some((&optimizer, &state)))?;
        tracing::info!(epoch = epoch + 1, loss = train_loss, val_dice = ?val_dice, "epoch done");
        if stalled {
            tracing::info!(
                best_epoch = ?state.best_epoch,
                "validation DSC has not improved for {} epochs; stopped early",
                config.validation.patience.unwrap_or_default()
            );
        }
    }
    if !interrupted {
        decide_postprocessing(dir, &val_cases, config, &device)?;
        bar.finish_with_message(format!(
            "done; best validation DSC {} (epoch {})",
            state.best_dice.map_or("-".into(), |d| format!("{d:.4}")),
            state.best_epoch.map_or("-".into(), |e| e.to_string())
        ));
        crate::figures::write_curves(&dir.join("metrics.jsonl"), &dir.join("curves.png"))?;
    }
    Ok(TrainOutcome {
        dir: dir.to_path_buf(),
        best_dice: state.best_dice,
        interrupted,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Loads a trained network from a run or model folder (`RUN/best`, else `RUN` itself).
pub fn load_model(path: &Path, device: &Device) -> Result<(Network, ModelCard, PathBuf)> {
    let dir = if path.join("best").join("model.safetensors").exists() {
        path.join("best")
    } else {
        path.to_path_buf()
    };
    let card = ModelCard::read(&dir)?;
    card.verify_weights(&dir)?;
    let network = card
        .model
        .load_for_inference(&dir.join("model.safetensors"), device)?;
    Ok((network, card, dir))
}
