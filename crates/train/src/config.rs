//! A run's configuration (`train.toml`): data, network, loss, optimizer, schedule, patches,
//! augmentation and validation, with [`TrainConfig::validate`] naming every bad field.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use cwseg_data::AugmentConfig;
use cwseg_losses::LossConfig;
use cwseg_models::{ModelConfig, Precision};
use serde::{Deserialize, Serialize};

use crate::optim::{LossScaling, OptimizerConfig, Schedule};
use crate::prepare::DataConfig;

/// Validation settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Validate every this many epochs (and after the last).
    pub every: usize,
    /// Sliding-window overlap.
    pub overlap: f64,
    /// Decide the post-processing on the validation cases after training (formulas §6).
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

/// Where a training patch's contour map comes from (formulas §1, "training on patches").
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
    pub(crate) fn legacy() -> Self {
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
    /// Patches per batch: the global batch, whatever the number of data-parallel ranks.
    pub batch_size: usize,
    /// The batch is drawn as this many equal parts, each from its own random stream (1: the
    /// batch's one stream, as before parts existed). `mpirun -n R` needs R to divide it, each
    /// rank training on `batch_parts / R` parts; with the same value a run draws the same
    /// batches on any number of ranks.
    pub batch_parts: usize,
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
    /// Convolution precision (`cwseg_models::precision`): bf16 on CUDA or where the CPU has
    /// AMX-BF16, f16 on CUDA; else the run trains in f32 (with a warning), and its model card
    /// and its `train.toml` say so (a resume elsewhere keeps f32).
    pub precision: Precision,
    /// Loss scaling (dynamic by default where the precision in effect is f16).
    pub loss_scaling: LossScaling,
    /// Region-based training ([`crate::regions`]): one sigmoid output per region (BraTS: WT,
    /// TC, ET), every loss in its region form, labels from the regions' class order. Absent:
    /// one softmax output per class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<crate::regions::RegionConfig>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: DataConfig::default(),
            model: ModelConfig::Unet(cwseg_models::UNetConfig::default()),
            loss: LossConfig::Cwcd(Default::default()),
            patch: [32, 32, 32],
            batch_size: 2,
            batch_parts: 1,
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
            precision: Precision::F32,
            loss_scaling: LossScaling::default(),
            regions: None,
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
        for problem in self.loss_scaling.problems() {
            check(false, problem);
        }
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
        for problem in self.augment.problems() {
            check(false, format!("augment.{problem}"));
        }
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
        check(
            self.batch_parts >= 1 && self.batch_size.is_multiple_of(self.batch_parts),
            format!(
                "batch_parts = {} must be at least 1 and divide batch_size = {}",
                self.batch_parts, self.batch_size
            ),
        );
        let multiples = self.model.size_multiples();
        check(
            (0..3).all(|a| self.patch[a].is_multiple_of(multiples[a])),
            format!(
                "patch {:?}: each side must be a multiple of {multiples:?} (z, y, x) for this \
                 network",
                self.patch
            ),
        );
        check(
            !(self.model.uses_batch_norm()
                && self.batch_size == 1
                && (0..3).all(|a| self.patch[a] / multiples[a] == 1)),
            format!(
                "batch 1 with patch {:?}: the deepest level's batch norm would see one value per channel; use a batch of at least 2, a larger patch, or instance/group norm",
                self.patch
            ),
        );
        check(
            self.regions.is_none() || self.loss.has_region_form(),
            format!(
                "loss `{}` has no region form for [regions] (region training takes ce and cedl \
                 without class weights, dl, gdl, dwce, cwce, sdl, cwcd or tversky)",
                self.loss.build().name()
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

/// Parses the TOML `text` of the file `path` as a `T`. The error is one line that names the
/// file, the line, the dotted field and serde's reason (an unknown field with the names
/// expected, a wrong type with the type wanted), e.g. `run.toml: line 3, column 1,
/// augment.flip_probabilty: unknown field `flip_probabilty`, expected one of …`: the multi-line
/// display of `toml::de::Error` would lose all but its first line in a one-line message.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    toml::from_str(text).map_err(|e| anyhow!("{}: {}", path.display(), describe(text, &e)))
}

/// `line L, column C, FIELD: MESSAGE` for a TOML error in `text` (the message alone when the
/// error has no position).
fn describe(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', "; ");
    let Some(before) = error.span().and_then(|s| text.get(..s.start)) else {
        return message;
    };
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_number = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or_default();
    let table = before[..line_start]
        .lines()
        .rev()
        .find_map(table_header)
        .unwrap_or_default();
    let field = match (table_header(line), line.split_once('=')) {
        (Some(header), _) => header,
        (None, Some((key, _))) if table.is_empty() => key.trim().to_string(),
        (None, Some((key, _))) => format!("{table}.{}", key.trim()),
        (None, None) => table,
    };
    if field.is_empty() {
        format!("line {line_number}, column {column}: {message}")
    } else {
        format!("line {line_number}, column {column}, {field}: {message}")
    }
}

/// The table a TOML header line opens (`[a.b]` or `[[a]]` → `a.b`, `a`), if it is one.
fn table_header(line: &str) -> Option<String> {
    let line = line.trim_start();
    let inner = line.strip_prefix("[[").or_else(|| line.strip_prefix('['))?;
    let end = inner.find(']')?;
    Some(inner[..end].trim().to_string())
}
