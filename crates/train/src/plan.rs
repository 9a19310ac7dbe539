//! `cwseg plan`: from a data set to a run configuration, as nnU-Net plans (PLANNING.md compares
//! the two on real data). Two steps, each data the user can read and edit:
//!
//! - the **fingerprint** ([`fingerprint`]): per case its shape, the shape of its non-zero box
//!   (what the crop keeps), spacing and orientation; per channel the foreground intensities
//!   nnU-Net measures (0.5 / 50 / 99.5 percentiles, mean, σ of the voxels with a label > 0, every
//!   case weighing the same); per class its voxel count. Reading every case is also the
//!   integrity check (nnU-Net's `--verify_dataset_integrity`): images and labels on one grid,
//!   one channel count, known label values, no NaN or ∞, orthogonal axes — errors name the case
//!   and the file.
//! - the **plan** ([`plan`]), nnU-Net's `ExperimentPlanner` (3d_fullres) rule by rule: the
//!   target spacing ([`target_spacing`]: the median, with the anisotropy rule), the median case
//!   at that spacing ([`median_shape`]), the patch ([`initial_patch`], [`nnunet_pooling`], then
//!   shrunk until a training step of batch 2 fits the memory budget by cwseg's own memory model),
//!   the network (`--recipe nnunet`: nnU-Net's own as a DynUNet, [`nnunet_network`], with its
//!   per-axis strides and kernels; the paper's recipe: cwseg's U-Net, whose depth
//!   [`Pooling::unet_depth`] is the fewest of nnU-Net's per-axis pooling, as it pools all axes
//!   together; the patch is fitted to the network that will train), the batch (as many
//!   patches as the budget holds, at least 2, at most 5 % of the data set's voxels), the crop and normalisation (CT: nnU-Net's scheme; other modalities: z-score, over
//!   the non-zero voxels when the crop to them keeps under 3/4 of the median case), and the
//!   contour band of 6 mm (docs/formulas.md §7) in erosions along each axis of the target
//!   spacing. Each choice's reason is written beside it ([`commented_toml`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use cwseg_data::{Dataset, ForegroundIntensities, IntensityProperties, Normalization, ReadOptions};
use cwseg_models::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::prepare::{DataConfig, Preprocessing};

/// One case as the fingerprint sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseFingerprint {
    /// The case id.
    pub id: String,
    /// Voxels `[z, y, x]`.
    pub shape: [usize; 3],
    /// Voxels of the box of the non-zero voxels (any channel), what a crop to them keeps
    /// (nnU-Net's `shapes_after_crop`).
    pub foreground_shape: [usize; 3],
    /// Spacing `[z, y, x]`, mm.
    pub spacing: [f64; 3],
    /// Orientation codes (`RAS`, `LPS`, …).
    pub orientation: String,
}

/// What [`fingerprint`] measured on a data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The data set's channel names.
    pub modalities: Vec<String>,
    /// The stored label values, background first.
    pub label_values: Vec<u8>,
    /// Every training case.
    pub cases: Vec<CaseFingerprint>,
    /// Per channel, the foreground intensities (every case weighing the same, as nnU-Net's).
    pub intensities: Vec<IntensityProperties>,
    /// Voxels of each stored label value over the training cases.
    pub class_voxels: BTreeMap<u8, u64>,
    /// Fraction of the image voxels (first channel) that are exactly 0, over every case.
    pub zero_fraction: f64,
}

impl Fingerprint {
    /// The median over cases of the fraction of voxels the crop to the non-zero box keeps,
    /// `Π foreground_shape / Π shape` (nnU-Net's `median_relative_size_after_cropping`).
    pub fn median_kept_fraction(&self) -> f64 {
        let volume = |s: [usize; 3]| s.iter().map(|&n| n as f64).product::<f64>();
        median(
            &mut self
                .cases
                .iter()
                .map(|c| volume(c.foreground_shape) / volume(c.shape).max(1.0))
                .collect::<Vec<_>>(),
        )
    }
}

/// Reads every training case of `dataset` (the integrity check) and measures it.
pub fn fingerprint(dataset: &Dataset) -> Result<Fingerprint> {
    if dataset.training.is_empty() {
        bail!("{}: no training cases to plan from", dataset.root.display());
    }
    let per_case = cwseg_data::foreground_voxels_per_case(dataset.training.len());
    let mut pools: Vec<ForegroundIntensities> = dataset
        .modalities
        .iter()
        .map(|_| ForegroundIntensities::new(per_case))
        .collect();
    let mut cases = Vec::new();
    let mut class_voxels = BTreeMap::new();
    let (mut zeros, mut voxels) = (0u64, 0u64);
    for case in &dataset.training {
        let (image, label) = dataset
            .load_case(case, &ReadOptions::default())
            .with_context(|| format!("case {}", case.id))?;
        let Some(label) = label else {
            bail!(
                "case {} ({}): no label file",
                case.id,
                case.images[0].display()
            );
        };
        check_orthogonal(&image.geometry, &case.images[0])?;
        for (pool, channel) in pools.iter_mut().zip(image.data.outer_iter()) {
            pool.add(channel, label.data.view())
                .with_context(|| format!("case {}", case.id))?;
        }
        let first = image.data.index_axis(ndarray::Axis(0), 0);
        zeros += first.iter().filter(|&&v| v == 0.0).count() as u64;
        voxels += first.len() as u64;
        for &k in &label.data {
            let value = dataset
                .label_values
                .get(usize::from(k))
                .copied()
                .unwrap_or(k);
            *class_voxels.entry(value).or_insert(0) += 1;
        }
        let foreground_shape = cwseg_data::crop::foreground_bbox(image.data.view())
            .map_or(image.geometry.shape(), |b| b.shape());
        cases.push(CaseFingerprint {
            id: case.id.clone(),
            shape: image.geometry.shape(),
            foreground_shape,
            spacing: image.geometry.spacing(),
            orientation: image.geometry.orientation().iter().collect(),
        });
    }
    let intensities = pools
        .iter()
        .map(ForegroundIntensities::properties)
        .collect::<cwseg_data::Result<Vec<_>>>()?;
    Ok(Fingerprint {
        modalities: dataset.modalities.clone(),
        label_values: dataset.label_values.clone(),
        cases,
        intensities,
        class_voxels,
        zero_fraction: zeros as f64 / voxels.max(1) as f64,
    })
}

/// Refuses a grid whose axes are not orthogonal (a sheared affine: resampling and flips would
/// move voxels wrongly).
fn check_orthogonal(geometry: &cwseg_data::Geometry, file: &std::path::Path) -> Result<()> {
    let a = geometry.affine();
    let column = |c: usize| [a[0][c], a[1][c], a[2][c]];
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        let (u, v) = (column(i), column(j));
        let dot: f64 = (0..3).map(|r| u[r] * v[r]).sum();
        let norm = |w: [f64; 3]| w.iter().map(|x| x * x).sum::<f64>().sqrt();
        if dot.abs() > 1e-3 * norm(u) * norm(v) {
            bail!(
                "{}: its voxel axes {i} and {j} are not orthogonal (a sheared affine); resample it \
                 onto an orthogonal grid first",
                file.display()
            );
        }
    }
    Ok(())
}

/// What the planner may use, and the training recipe it writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanBudget {
    /// Memory for a training step, GiB.
    pub memory_gib: f64,
    /// The optimiser, schedule, augmentation and supervision the plan writes.
    pub recipe: Recipe,
    /// A training time to fit, minutes: the epochs come from a calibration run on this machine
    /// ([`crate::calibrate`]); `None` keeps the default epochs.
    pub minutes: Option<f64>,
}

/// A training recipe: how the planned network is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    /// The paper's: Adam 3e-4 halved at 50 % and 75 % of the epochs, in-plane rotation and
    /// flips with probability 0.2, one output.
    #[default]
    Paper,
    /// nnU-Net's: its network ([`nnunet_network`], a DynUNet pooling each axis on its own)
    /// with its deep supervision, SGD with Nesterov momentum 0.99, lr 0.01, weight decay 3e-5,
    /// poly schedule (power 0.9), nnU-Net's augmentation (`AugmentConfig::nnunet`).
    Nnunet,
}

impl Recipe {
    /// Writes the recipe into `config`, with its reasons.
    fn apply(self, config: &mut TrainConfig, reasons: &mut BTreeMap<String, String>) {
        if self == Recipe::Paper {
            return;
        }
        config.optimizer = crate::optim::OptimizerConfig::nnunet();
        config.schedule = crate::optim::Schedule::nnunet();
        config.augment = cwseg_data::AugmentConfig::nnunet();
        if let ModelConfig::Unet(unet) = &mut config.model {
            unet.deep_supervision = true;
            reasons.insert(
                "model.deep_supervision".into(),
                "nnU-Net's deep supervision: an output at every decoder level but the lowest, \
                 weighted 2^-l normalised"
                    .into(),
            );
        }
        for (field, why) in [
            (
                "optimizer",
                "nnU-Net's recipe (--recipe nnunet): SGD, Nesterov momentum 0.99, lr 0.01, weight decay 3e-5",
            ),
            (
                "schedule",
                "nnU-Net's PolyLRScheduler: lr (1 − epoch/epochs)^0.9",
            ),
            (
                "augment",
                "nnU-Net's default training augmentation (docs/formulas.md §6)",
            ),
        ] {
            reasons.insert(field.into(), why.into());
        }
    }
}

/// What the plan derived on its way, beside the configuration (for reports and the comparison
/// with nnU-Net's planner).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanDetails {
    /// The median case at the target spacing, voxels `[z, y, x]` ([`median_shape`]).
    pub median_shape: [f64; 3],
    /// The patch before the memory fit: [`initial_patch`] padded to its pooling.
    pub first_patch: [usize; 3],
    /// nnU-Net's pooling for the planned patch ([`nnunet_pooling`]); the U-Net's depth is its
    /// [`Pooling::unet_depth`].
    pub pooling: Pooling,
    /// Estimated bytes of a training step at the planned patch and batch ([`step_bytes`]).
    pub step_bytes: u128,
}

/// A planned run: the configuration, and the reason of each choice by field.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The run configuration.
    pub config: TrainConfig,
    /// `field → why this value` (dotted TOML paths).
    pub reasons: BTreeMap<String, String>,
    /// What the plan derived on its way (`None` for a configuration not planned from data).
    pub details: Option<PlanDetails>,
}

/// `cwseg plan`'s memory for a training step when `--memory` is not given, GiB.
pub const DEFAULT_MEMORY_GIB: f64 = 4.0;

/// The contour band the paper used, mm (6 erosions of a 3-cube at 1 mm).
pub const BAND_MM: f64 = 6.0;

/// nnU-Net's smallest edge of a feature map, voxels (`UNet_featuremap_min_edge_length`): an axis
/// is pooled while its feature map has at least twice this.
pub const MIN_FEATURE_MAP: usize = 4;

/// nnU-Net's anisotropy threshold (`ANISO_THRESHOLD`).
pub const ANISOTROPY: f64 = 3.0;

/// The deepest U-Net cwseg builds (`UNetConfig::depth` in 1..=6).
pub const MAX_DEPTH: usize = 6;

/// The median of `values` (numpy's: the mean of the two middle ones for an even count; 0 for
/// none).
fn median(values: &mut [f64]) -> f64 {
    percentile(values, 50.0)
}

/// The `q`-th percentile, numpy's linear interpolation ([`cwseg_metrics::quantile`]); 0 for no
/// values.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    let p = cwseg_metrics::quantile::percentile(values, q);
    if p.is_nan() { 0.0 } else { p }
}

/// `f(case)` per axis, the median over cases.
fn median_per_axis(
    cases: &[CaseFingerprint],
    f: impl Fn(&CaseFingerprint, usize) -> f64,
) -> [f64; 3] {
    std::array::from_fn(|a| median(&mut cases.iter().map(|c| f(c, a)).collect::<Vec<_>>()))
}

/// The target spacing, nnU-Net's `determine_fullres_target_spacing`: the median spacing `t`
/// per axis; when the coarsest axis `w` is anisotropic in spacing, `t_w > 3 · max_{a≠w} t_a`,
/// and in voxels, `3 · n_w < min_{a≠w} n_a` (`n`: the median shape after the crop), it takes the
/// 10th percentile of its spacings instead, at least `max_{a≠w} t_a + 10⁻⁵`.
pub fn target_spacing(cases: &[CaseFingerprint]) -> [f64; 3] {
    let mut target = median_per_axis(cases, |c, a| c.spacing[a]);
    let sizes = median_per_axis(cases, |c, a| c.foreground_shape[a] as f64);
    // numpy's argmax: the first of equal maxima
    let worst = (0..3).fold(0, |w, a| if target[a] > target[w] { a } else { w });
    let others = (0..3).filter(|&a| a != worst);
    let other_spacing = others.clone().map(|a| target[a]).fold(0.0, f64::max);
    let other_size = others.map(|a| sizes[a]).fold(f64::INFINITY, f64::min);
    if target[worst] > ANISOTROPY * other_spacing && sizes[worst] * ANISOTROPY < other_size {
        let mut axis: Vec<f64> = cases.iter().map(|c| c.spacing[worst]).collect();
        let tenth = percentile(&mut axis, 10.0);
        target[worst] = if tenth < other_spacing {
            other_spacing.max(tenth) + 1e-5
        } else {
            tenth
        };
    }
    target
}

/// The median case at `spacing`, nnU-Net's: per axis the median over cases of
/// `round(s_a / t_a · n_a)` (`n`: the shape after the crop to the non-zero box, `s`: the case's
/// spacing, `t`: the target; ties to even, as Python's `round`).
pub fn median_shape(cases: &[CaseFingerprint], spacing: [f64; 3]) -> [f64; 3] {
    median_per_axis(cases, |c, a| {
        (c.spacing[a] / spacing[a] * c.foreground_shape[a] as f64).round_ties_even()
    })
}

/// nnU-Net's first patch: the box of 256³ voxels whose sides are equal in mm,
/// `p_a = round(256 · (Π_b s_b)^{1/3} / s_a)`, clipped to the median shape `m`.
pub fn initial_patch(spacing: [f64; 3], median: [f64; 3]) -> [f64; 3] {
    let inverse = spacing.map(|s| 1.0 / s);
    let scale = (256f64.powi(3) / inverse.iter().product::<f64>()).cbrt();
    std::array::from_fn(|a| (inverse[a] * scale).round_ties_even().min(median[a]))
}

/// The down-sampling nnU-Net's `get_pool_and_conv_props` chooses for a patch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pooling {
    /// Pooling operations per axis `[z, y, x]`.
    pub per_axis: [usize; 3],
    /// Each down-sampling stage's stride per axis (1: the axis is not pooled at that stage).
    pub strides: Vec<[usize; 3]>,
    /// The convolution kernel of every stage, stage 0 (unpooled) first and the bottleneck
    /// last, one more than [`Pooling::strides`] (nnU-Net's `conv_kernel_sizes`, see
    /// [`nnunet_pooling`]).
    #[serde(default)]
    pub kernels: Vec<[usize; 3]>,
}

impl Pooling {
    /// `2^pools` per axis: what each side of the patch must be a multiple of.
    pub fn divisor(&self) -> [usize; 3] {
        self.per_axis.map(|k| 1usize << k.min(30))
    }

    /// The depth of cwseg's U-Net for this pooling. The U-Net pools every axis at every level
    /// (2³, no per-axis strides), so it takes the fewest pooling operations of any axis — no
    /// axis's bottleneck falls below [`MIN_FEATURE_MAP`] voxels, and the axes nnU-Net pools more
    /// keep a larger bottleneck — within the U-Net's 1..=[`MAX_DEPTH`].
    pub fn unet_depth(&self) -> usize {
        let fewest = self.per_axis.iter().copied().min().unwrap_or(1);
        fewest.clamp(1, MAX_DEPTH)
    }
}

/// nnU-Net's pooling rule, stage by stage on feature-map sizes `n` (from the patch) and
/// spacings `s`: the candidate axes have `n_a ≥ 2·4`; of those, the ones with
/// `s_a < 2 · min s` are pooled (stride 2, `n_a ← ⌈n_a / 2⌉`, `s_a ← 2 s_a`); a lone candidate
/// needs `n_a ≥ 3·4`; it stops when no axis qualifies. Anisotropic spacing so pools the fine
/// axes first, until their spacing comes within 2× of the coarse one.
///
/// The kernels, nnU-Net's rule: every axis starts at 1; at each stage that pools, before its
/// pooling, an axis whose spacing is within 2× of the finest of all three, `s_a < 2 · min s`,
/// turns to 3 and stays 3; that stage's kernel is the current one (so a thick-slice axis is
/// convolved in-plane only until pooling brings the others within 2× of it); the bottleneck's
/// is 3³.
pub fn nnunet_pooling(spacing: [f64; 3], patch: [f64; 3]) -> Pooling {
    let min = MIN_FEATURE_MAP as f64;
    let (mut s, mut n) = (spacing, patch);
    let mut pooling = Pooling {
        per_axis: [0; 3],
        strides: Vec::new(),
        kernels: Vec::new(),
    };
    let mut kernel = [1; 3];
    loop {
        let fits: Vec<usize> = (0..3).filter(|&a| n[a] >= 2.0 * min).collect();
        let Some(finest) = fits.iter().map(|&a| s[a]).min_by(f64::total_cmp) else {
            break;
        };
        let axes: Vec<usize> = fits.into_iter().filter(|&a| s[a] / finest < 2.0).collect();
        if axes.len() == 1 && n[axes[0]] < 3.0 * min {
            break;
        }
        let all_finest = s.iter().copied().fold(f64::INFINITY, f64::min);
        for (k, &sa) in kernel.iter_mut().zip(&s) {
            if sa / all_finest < 2.0 {
                *k = 3;
            }
        }
        pooling.kernels.push(kernel);
        let mut stride = [1; 3];
        for &a in &axes {
            stride[a] = 2;
            pooling.per_axis[a] += 1;
            s[a] *= 2.0;
            n[a] = (n[a] / 2.0).ceil();
        }
        pooling.strides.push(stride);
    }
    pooling.kernels.push([3; 3]);
    pooling
}

/// `patch` rounded up to multiples of `divisor`, `⌈p_a / d_a⌉ · d_a` (nnU-Net's `pad_shape`).
fn pad(patch: [f64; 3], divisor: [usize; 3]) -> [usize; 3] {
    std::array::from_fn(|a| {
        let d = divisor[a] as f64;
        ((patch[a] / d).ceil().max(1.0) * d) as usize
    })
}

/// The U-Net `model` with `depth` levels.
fn with_depth(model: &ModelConfig, depth: usize) -> ModelConfig {
    match model {
        ModelConfig::Unet(c) => ModelConfig::Unet(cwseg_models::UNetConfig { depth, ..*c }),
        other => other.clone(),
    }
}

/// nnU-Net's features of its first stage (`UNet_base_num_features`).
pub const NNUNET_BASE_FEATURES: usize = 32;

/// nnU-Net's most features of a 3-D stage (`UNet_max_features_3d`).
pub const NNUNET_MAX_FEATURES: usize = 320;

/// nnU-Net's features of each of `stages` stages: `min(32 · 2^s, 320)`.
pub fn nnunet_features(stages: usize) -> Vec<usize> {
    (0..stages)
        .map(|s| {
            let doubled = 1usize.checked_shl(s as u32).unwrap_or(usize::MAX);
            NNUNET_BASE_FEATURES
                .saturating_mul(doubled)
                .min(NNUNET_MAX_FEATURES)
        })
        .collect()
}

/// nnU-Net's network (3d_fullres) for `pooling`, as MONAI's DynUNet: a stage per pooling plus
/// stage 0 (stride 1), nnU-Net's strides and kernels per stage ([`nnunet_pooling`]), the
/// transposed convolutions undoing the strides, [`nnunet_features`], instance norm with affine
/// parameters, LeakyReLU 0.01, two convolutions per block, bias in the transposed convolutions
/// (nnU-Net's `conv_bias`), no dropout. Deep supervision as nnU-Net trains it: nnU-Net
/// outputs at every decoder stage and weighs the lowest 0, so the outputs that count are the
/// full resolution and `stages − 3` heads (`deep_supr_num`; off below 4 stages, where only the
/// full resolution counts). An error below 3 stages (DynUNet's least).
pub fn nnunet_network(
    pooling: &Pooling,
    in_channels: usize,
    classes: usize,
) -> Result<ModelConfig> {
    let stages = pooling.strides.len() + 1;
    if stages < 3 {
        bail!(
            "nnU-Net pools this patch {:?} times per axis: {stages} stages, and a DynUNet needs \
             at least 3 (the median case is too small; use the paper's recipe)",
            pooling.per_axis
        );
    }
    if pooling.kernels.len() != stages {
        bail!(
            "the pooling has {} kernels for {stages} stages",
            pooling.kernels.len()
        );
    }
    let strides: Vec<[usize; 3]> = std::iter::once([1; 3])
        .chain(pooling.strides.iter().copied())
        .collect();
    Ok(ModelConfig::Dynunet(cwseg_models::DynUNetConfig {
        in_channels,
        classes,
        kernel_size: pooling.kernels.clone(),
        upsample_kernel_size: pooling.strides.clone(),
        strides,
        filters: nnunet_features(stages),
        norm: cwseg_models::DynUNetNorm::InstanceAffine,
        negative_slope: 0.01,
        dropout: None,
        deep_supervision: stages >= 4,
        deep_supr_num: stages.saturating_sub(3).max(1),
        res_block: false,
        trans_bias: true,
    }))
}

/// The network a recipe trains on `candidate` and the patch it trains on: the paper's, cwseg's
/// U-Net of [`Pooling::unet_depth`] levels (`base`'s other fields) on
/// [`Candidate::unet_patch`]; nnU-Net's, [`nnunet_network`] on [`Candidate::dynunet_patch`].
fn network_for(
    recipe: Recipe,
    base: &ModelConfig,
    candidate: &Candidate,
) -> Result<(ModelConfig, [usize; 3])> {
    match recipe {
        Recipe::Paper => Ok((
            with_depth(base, candidate.pooling.unet_depth()),
            candidate.unet_patch(),
        )),
        Recipe::Nnunet => {
            let model = nnunet_network(&candidate.pooling, base.in_channels(), base.classes())?;
            let patch = candidate.dynunet_patch(&model);
            Ok((model, patch))
        }
    }
}

/// Estimated heap of a training step of `batch` patches, bytes:
/// `b · (1 + t) · A + 16 · P` — per sample the activations `A` kept for the backward pass and
/// its transients `t·A` ([`cwseg_models::training_bytes`]), once the weights, their gradients
/// and Adam's two moments (4 + 4 + 8 bytes per parameter `P`).
pub fn step_bytes(model: &ModelConfig, patch: [usize; 3], batch: usize) -> Result<u128> {
    let (per_sample, fixed) = step_parts(model, patch)?;
    Ok(per_sample * batch as u128 + fixed)
}

/// The two terms of [`step_bytes`]: `((1 + t) · A, 16 · P)`.
fn step_parts(model: &ModelConfig, patch: [usize; 3]) -> Result<(u128, u128)> {
    let d = cwseg_models::describe(model, patch)?;
    let p = u128::from(d.parameters);
    Ok((u128::from(d.training_bytes).saturating_sub(4 * p), 16 * p))
}

/// One patch nnU-Net's planner tries, with its pooling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Voxels `[z, y, x]`, multiples of [`Pooling::divisor`] (nnU-Net's patch).
    pub patch: [usize; 3],
    /// nnU-Net's pooling of it (computed before the padding, as nnU-Net does).
    pub pooling: Pooling,
}

impl Candidate {
    /// The patch `start` padded to nnU-Net's pooling of it (`get_pool_and_conv_props`).
    pub fn new(spacing: [f64; 3], start: [f64; 3]) -> Self {
        let pooling = nnunet_pooling(spacing, start);
        Candidate {
            patch: pad(start, pooling.divisor()),
            pooling,
        }
    }

    /// nnU-Net's step down: the axis largest against the median shape (the last of equals)
    /// loses the divisor its side would have after losing its current one (no valid size is
    /// skipped), then the pooling is recomputed; `None` when the patch would not get smaller.
    pub fn shrink(&self, spacing: [f64; 3], median: [f64; 3]) -> Option<Self> {
        let ratio = |a: usize| self.patch[a] as f64 / median[a];
        let axis = (0..3).max_by(|&a, &b| ratio(a).total_cmp(&ratio(b)))?;
        let mut side = self.patch.map(|p| p as f64);
        let mut probe = side;
        probe[axis] -= self.pooling.divisor()[axis] as f64;
        side[axis] -= nnunet_pooling(spacing, probe).divisor()[axis] as f64;
        if side[axis] < 1.0 {
            return None;
        }
        let next = Candidate::new(spacing, side);
        let volume = |p: [usize; 3]| p.iter().product::<usize>();
        (volume(next.patch) < volume(self.patch)).then_some(next)
    }

    /// The patch of cwseg's U-Net: nnU-Net's, rounded up to multiples of `2^depth`
    /// ([`Pooling::unet_depth`]); the same unless an axis is too short to pool at all (depth 1
    /// still halves it).
    pub fn unet_patch(&self) -> [usize; 3] {
        let step = 1usize << self.pooling.unet_depth();
        self.patch.map(|p| p.div_ceil(step) * step)
    }

    /// The patch of nnU-Net's network `model` ([`nnunet_network`]): nnU-Net's, each side a
    /// multiple of the model's total stride along it ([`ModelConfig::size_multiples`]), so
    /// nnU-Net's padded patch itself, thick-slice axes included.
    pub fn dynunet_patch(&self, model: &ModelConfig) -> [usize; 3] {
        let steps = model.size_multiples();
        std::array::from_fn(|a| {
            let step = steps[a].max(1);
            self.patch[a].div_ceil(step) * step
        })
    }
}

/// The patches nnU-Net's planner tries, largest first: [`initial_patch`] padded to its
/// [`nnunet_pooling`], then step after step down ([`Candidate::shrink`]) until a step would not
/// shrink it. nnU-Net stops at the first whose feature-map count fits its reference for 8 GB;
/// cwseg at the first whose training step fits the memory budget ([`step_bytes`]).
pub fn patch_candidates(spacing: [f64; 3], median: [f64; 3]) -> impl Iterator<Item = Candidate> {
    let first = Candidate::new(spacing, initial_patch(spacing, median));
    std::iter::successors(Some(first), move |c| c.shrink(spacing, median))
}

/// What [`fit_patch`] chose.
struct Fitted {
    /// nnU-Net's candidate patch and its pooling.
    candidate: Candidate,
    /// The network the plan trains ([`network_for`]).
    model: ModelConfig,
    /// The patch it trains on.
    patch: [usize; 3],
    /// The first candidate's patch for that network.
    first_patch: [usize; 3],
}

/// The first of [`patch_candidates`] whose training step of batch 2 fits `limit` bytes, with
/// the recipe's network for it ([`network_for`]: its own memory estimate, so the patch fits
/// the network that will train); an error when even the smallest does not fit.
fn fit_patch(
    recipe: Recipe,
    base: &ModelConfig,
    spacing: [f64; 3],
    median: [f64; 3],
    limit: u128,
) -> Result<Fitted> {
    let mut first = None;
    let mut smallest = None;
    for candidate in patch_candidates(spacing, median) {
        let (model, patch) = network_for(recipe, base, &candidate)?;
        let bytes = step_bytes(&model, patch, 2)?;
        let first_patch = *first.get_or_insert(patch);
        if bytes <= limit {
            return Ok(Fitted {
                candidate,
                model,
                patch,
                first_patch,
            });
        }
        smallest = Some((patch, bytes));
    }
    let (patch, bytes) = smallest.unwrap_or(([0; 3], 0));
    bail!(
        "even a patch of {patch:?} voxels needs an estimated {} GiB for a training step of \
         batch 2, more than --memory {} GiB",
        gib(bytes),
        gib(limit)
    )
}

/// `bytes` in GiB for a message: two decimals, or three significant digits below 0.01 GiB (so
/// that a small budget and a small need never both read 0.00).
fn gib(bytes: u128) -> String {
    let g = bytes as f64 / GIB;
    if g >= 0.01 || g == 0.0 {
        format!("{g:.2}")
    } else {
        format!("{g:.2e}")
    }
}

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// The batch: the most patches whose training step fits, `step(b) ≤ limit`, capped as
/// nnU-Net caps it so that one batch sees at most 5 % of the data set's voxels,
/// `round(0.05 · cases · Π m / Π p)`, and at least 2 (nnU-Net's smallest; batch norm needs more
/// than one sample); with its reason.
fn batch_size(
    model: &ModelConfig,
    patch: [usize; 3],
    limit: u128,
    cases: usize,
    median: [f64; 3],
) -> Result<(usize, String)> {
    let (per_sample, fixed) = step_parts(model, patch)?;
    let by_memory = limit.saturating_sub(fixed) / per_sample.max(1);
    let voxels = |s: [f64; 3]| s.iter().product::<f64>();
    let covered = (0.05 * cases as f64 * voxels(median) / voxels(patch.map(|p| p as f64)))
        .round_ties_even() as u128;
    let batch = by_memory.min(covered).max(2) as usize;
    let why = format!(
        "{by_memory} patches fit --memory, 5 % of the data set's voxels make {covered} (nnU-Net's \
         cap on a batch), and at least 2 (nnU-Net's smallest; batch norm needs more than one \
         sample)"
    );
    Ok((batch, why))
}

/// The plan for `fingerprint`'s data set at `source` (see the module).
pub fn plan(fingerprint: &Fingerprint, source: &str, budget: PlanBudget) -> Result<Plan> {
    let mut reasons = BTreeMap::new();
    let cases = &fingerprint.cases;
    // as the model card will read it back (a resumed run compares the two)
    let spacing = target_spacing(cases);
    spacing_reason(cases, spacing, &mut reasons);
    let normalization = normalization(fingerprint, &mut reasons);
    let crop = cases.iter().any(|c| c.foreground_shape != c.shape);
    reasons.insert(
        "data.preprocessing.crop_foreground".into(),
        format!(
            "nnU-Net crops every case to its non-zero box; here it keeps a median {:.0} % of the \
             voxels{}",
            100.0 * fingerprint.median_kept_fraction(),
            if crop { "" } else { " (nothing to crop)" }
        ),
    );
    let median = median_shape(cases, spacing);
    let model = ModelConfig::from_name(
        "unet",
        fingerprint.modalities.len(),
        fingerprint.label_values.len(),
    )?;
    let limit = (budget.memory_gib * GIB) as u128;
    let fitted = fit_patch(budget.recipe, &model, spacing, median, limit)?;
    let (model, patch) = (fitted.model.clone(), fitted.patch);
    let (batch, why) = batch_size(&model, patch, limit, cases.len(), median)?;
    reasons.insert("batch_size".into(), why);
    let bytes = step_bytes(&model, patch, batch)?;
    let step = Step {
        bytes,
        batch,
        memory_gib: budget.memory_gib,
    };
    network_reasons(&fitted, median, step, &mut reasons);
    let loss = contour_loss(spacing, &mut reasons)?;
    let regions = crate::regions::RegionConfig::brats(&fingerprint.label_values);
    if regions.is_some() {
        reasons.insert(
            "regions".into(),
            "BraTS labels (necrosis 1, oedema 2, enhancing tumour): nested regions trained as \
             nnU-Net does, one sigmoid output each (WT, TC, ET); evaluate with `--regions brats`"
                .into(),
        );
    }
    let mut config = TrainConfig {
        data: DataConfig {
            source: source.to_string(),
            preprocessing: Some(Preprocessing {
                reorient: false,
                crop_foreground: crop,
                spacing: Some(spacing),
                normalization,
            }),
            ..DataConfig::default()
        },
        model: model.with_input_size(patch),
        loss,
        patch,
        batch_size: batch,
        regions,
        ..TrainConfig::default()
    };
    budget.recipe.apply(&mut config, &mut reasons);
    config
        .validate()
        .context("the plan is not a valid run configuration")?;
    let details = PlanDetails {
        median_shape: median,
        first_patch: fitted.first_patch,
        pooling: fitted.candidate.pooling,
        step_bytes: bytes,
    };
    Ok(Plan {
        config,
        reasons,
        details: Some(details),
    })
}

/// The target spacing's reason: the medians, and whether the anisotropy rule changed one.
fn spacing_reason(
    cases: &[CaseFingerprint],
    spacing: [f64; 3],
    reasons: &mut BTreeMap<String, String>,
) {
    let medians = median_per_axis(cases, |c, a| c.spacing[a]);
    let rule = if spacing != medians {
        "; the coarsest axis is over 3× the others in spacing and under 1/3 in voxels: it takes \
         its 10th percentile (nnU-Net's anisotropy rule)"
    } else {
        ""
    };
    reasons.insert(
        "data.preprocessing.spacing".into(),
        format!(
            "the median spacing {medians:?} mm per axis (z, y, x) of {} cases{rule}",
            cases.len()
        ),
    );
}

/// The planned training step: its estimated bytes, its batch and the budget.
#[derive(Debug, Clone, Copy)]
struct Step {
    bytes: u128,
    batch: usize,
    memory_gib: f64,
}

/// The reasons of the patch and the network's fields.
fn network_reasons(
    fitted: &Fitted,
    median: [f64; 3],
    step: Step,
    reasons: &mut BTreeMap<String, String>,
) {
    let shrunk = if fitted.first_patch == fitted.patch {
        String::new()
    } else {
        format!(
            ", stepped down along the side largest against the median case (nnU-Net's order) \
             from {:?}",
            fitted.first_patch
        )
    };
    let rounded = if fitted.patch == fitted.candidate.patch {
        String::new()
    } else {
        format!(
            " (nnU-Net's {:?}, rounded up to one multiple for all sides)",
            fitted.candidate.patch
        )
    };
    reasons.insert(
        "patch".into(),
        format!(
            "the median case at the target spacing is {:?} voxels; nnU-Net's patch: a 256³ box \
             of equal sides in mm clipped to it, padded to multiples of 2^pools{shrunk}{rounded}; \
             a training step of batch {} needs an estimated {:.2} GiB of --memory {} GiB",
            median.map(|n| n.round() as usize),
            step.batch,
            step.bytes as f64 / GIB,
            step.memory_gib
        ),
    );
    match &fitted.model {
        ModelConfig::Dynunet(c) => dynunet_reasons(&fitted.candidate.pooling, c, reasons),
        _ => unet_reasons(&fitted.candidate.pooling, reasons),
    }
}

/// `[[1, 2, 2], …]` as `122 …`.
fn compact(per_stage: &[[usize; 3]]) -> String {
    let stages: Vec<String> = per_stage
        .iter()
        .map(|s| format!("{}{}{}", s[0], s[1], s[2]))
        .collect();
    stages.join(" ")
}

/// The U-Net's depth: the fewest of nnU-Net's pooling operations of any axis.
fn unet_reasons(pooling: &Pooling, reasons: &mut BTreeMap<String, String>) {
    reasons.insert(
        "model.depth".into(),
        format!(
            "nnU-Net pools this patch {:?} times per axis (z, y, x; until a feature map would \
             drop below {MIN_FEATURE_MAP} voxels; strides per stage {}); the U-Net pools all \
             three axes together (2³), so it takes the fewest, {}",
            pooling.per_axis,
            compact(&pooling.strides),
            pooling.unet_depth()
        ),
    );
}

/// nnU-Net's network as a DynUNet: each field's rule ([`nnunet_network`]).
fn dynunet_reasons(
    pooling: &Pooling,
    c: &cwseg_models::DynUNetConfig,
    reasons: &mut BTreeMap<String, String>,
) {
    let stages = c.strides.len();
    let heads = if c.deep_supervision {
        format!(
            "the full resolution and {} head{}, weighted 2^-l normalised; nnU-Net also \
             outputs at the lowest decoder stage but weighs it 0",
            c.deep_supr_num,
            if c.deep_supr_num == 1 { "" } else { "s" }
        )
    } else {
        "off: with 3 stages only nnU-Net's full-resolution output has a weight".to_string()
    };
    for (field, why) in [
        (
            "model.name",
            "nnU-Net's network (--recipe nnunet): its PlainConvUNet in MONAI's DynUNet layout, \
             pooling each axis on its own"
                .to_string(),
        ),
        (
            "model.kernel_size",
            format!(
                "nnU-Net's kernels per stage ({}): 3 along an axis once its spacing at that stage \
                 is within 2× of the finest, else 1; 3³ at the bottleneck",
                compact(&c.kernel_size)
            ),
        ),
        (
            "model.strides",
            format!(
                "nnU-Net's {stages} stages: stage 0 unpooled, then its pooling per stage ({}; \
                 {:?} times per axis), an axis pooled while its feature map keeps at least \
                 {MIN_FEATURE_MAP} voxels and its spacing is within 2× of the finest",
                compact(&pooling.strides),
                pooling.per_axis
            ),
        ),
        (
            "model.upsample_kernel_size",
            "nnU-Net's transposed convolutions: kernel = stride".to_string(),
        ),
        (
            "model.filters",
            format!(
                "nnU-Net's features per stage, min({NNUNET_BASE_FEATURES} · 2^stage, \
                 {NNUNET_MAX_FEATURES})"
            ),
        ),
        (
            "model.norm",
            "nnU-Net's InstanceNorm3d(eps 1e-5, affine)".to_string(),
        ),
        (
            "model.negative_slope",
            "nnU-Net's LeakyReLU(0.01)".to_string(),
        ),
        (
            "model.deep_supervision",
            format!("nnU-Net's deep supervision: {heads}"),
        ),
        (
            "model.deep_supr_num",
            format!(
                "{stages} stages − 3: nnU-Net's weighted decoder outputs ({stages} − 2) less the \
                 full resolution's"
            ),
        ),
        (
            "model.trans_bias",
            "nnU-Net's transposed convolutions have a bias (its conv_bias)".to_string(),
        ),
    ] {
        reasons.insert(field.into(), why);
    }
}

/// CWCD with the contour band of [`BAND_MM`] in erosions along each axis of the target spacing,
/// `n_a = max(1, round(6 mm / t_a))`: `iterations` when every axis has the same count, else
/// `iterations_per_axis` (and `iterations` their largest, unused).
fn contour_loss(
    spacing: [f64; 3],
    reasons: &mut BTreeMap<String, String>,
) -> Result<cwseg_losses::LossConfig> {
    // n_a = max(1, round(band / s_a)) erosions of the 3-cube along each axis
    let per_axis = spacing.map(|s| ((BAND_MM / s).round() as usize).max(1));
    let contour = if per_axis.iter().all(|&n| n == per_axis[0]) {
        reasons.insert(
            "loss.contour.iterations".into(),
            format!(
                "a {BAND_MM} mm contour band (the paper's 6 erosions at 1 mm) at the target \
                 spacing {:?} mm",
                spacing
            ),
        );
        format!(r#"{{"iterations": {}}}"#, per_axis[0])
    } else {
        reasons.insert(
            "loss.contour.iterations_per_axis".into(),
            format!(
                "a {BAND_MM} mm contour band (the paper's 6 erosions at 1 mm) along each axis of \
                 the anisotropic target spacing {spacing:?} mm: round(6 mm / spacing)"
            ),
        );
        format!(
            r#"{{"iterations": {}, "iterations_per_axis": {per_axis:?}}}"#,
            per_axis.iter().max().copied().unwrap_or(1)
        )
    };
    Ok(cwseg_losses::LossConfig::from_json(&format!(
        r#"{{"name": "cwcd", "contour": {contour}}}"#
    ))?)
}

/// nnU-Net's choice: a channel named `CT` takes its CTNormalization, measured on the training
/// cases when a run opens; any other channel z-score, over the non-zero voxels when the crop to
/// them keeps under 3/4 of the median case (nnU-Net's `use_mask_for_norm`), else over all.
fn normalization(
    fingerprint: &Fingerprint,
    reasons: &mut BTreeMap<String, String>,
) -> Normalization {
    let ct = fingerprint
        .modalities
        .iter()
        .any(|m| m.eq_ignore_ascii_case("ct"));
    let kept = fingerprint.median_kept_fraction();
    let (choice, why) = if ct {
        (
            Normalization::NnunetCt,
            "a CT channel: clip to the training foreground's 0.5–99.5 percentiles, then its \
             mean and σ (nnU-Net's CTNormalization)"
                .to_string(),
        )
    } else if kept < 0.75 {
        (
            Normalization::ZScoreNonZero,
            format!(
                "not CT, and the crop to the non-zero voxels keeps {:.0} % (< 75 %) of the median \
                 case: z-score per case over the non-zero voxels (nnU-Net's ZScoreNormalization \
                 with use_mask_for_norm)",
                100.0 * kept
            ),
        )
    } else {
        (
            Normalization::ZScore,
            "not CT: z-score per case (nnU-Net's ZScoreNormalization)".to_string(),
        )
    };
    reasons.insert("data.preprocessing.normalization".into(), why);
    choice
}

/// `config` as TOML with each planned field's reason as a comment above it, and a header.
pub fn commented_toml(plan: &Plan, header: &str) -> Result<String> {
    let text = toml::to_string(&plan.config).context("the plan as TOML")?;
    let mut out = String::new();
    for line in header.lines() {
        let _ = writeln!(out, "# {line}");
    }
    out.push('\n');
    let mut table = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        let path = if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            table = name.trim_matches(['[', ']']).to_string();
            Some(table.clone())
        } else {
            trimmed.split_once(" = ").map(|(key, _)| {
                if table.is_empty() {
                    key.to_string()
                } else {
                    format!("{table}.{key}")
                }
            })
        };
        if let Some(path) = path {
            // what the field is, then why the plan chose its value
            match (field_doc(&path), plan.reasons.get(&path)) {
                (Some(doc), Some(why)) => {
                    let _ = writeln!(out, "# {doc}: {why}");
                }
                (Some(doc), None) => {
                    let _ = writeln!(out, "# {doc}");
                }
                (None, Some(why)) => {
                    let _ = writeln!(out, "# {why}");
                }
                (None, None) => {}
            }
        }
        let _ = writeln!(out, "{line}");
    }
    Ok(out)
}

/// Reads every training case of the data set at `data` (the integrity check); the number of
/// cases.
pub fn verify(data: &std::path::Path) -> Result<usize> {
    let dataset = Dataset::open(data)?;
    Ok(fingerprint(&dataset)?.cases.len())
}

/// Plans the data set at `data` within `budget` and writes the commented run configuration to
/// `out` and the fingerprint beside it (`fingerprint.json`), both checked before either is
/// written.
pub fn write_plan(
    data: &std::path::Path,
    out: &std::path::Path,
    budget: PlanBudget,
) -> Result<Plan> {
    if !(budget.memory_gib.is_finite() && budget.memory_gib > 0.0) {
        bail!("--memory {}: a positive number of GiB", budget.memory_gib);
    }
    if let Some(minutes) = budget.minutes
        && !(minutes.is_finite() && minutes > 0.0)
    {
        bail!("--minutes {minutes}: a positive number of minutes");
    }
    check_out_is_a_file(out)?;
    // before reading every case: the folder the plan goes to must exist
    if let Some(folder) = out.parent().filter(|p| !p.as_os_str().is_empty())
        && !folder.is_dir()
    {
        bail!(
            "--out {}: the folder {} does not exist",
            out.display(),
            folder.display()
        );
    }
    let dataset = Dataset::open(data)?;
    let fingerprint = fingerprint(&dataset)?;
    let fingerprint_file = out.with_file_name("fingerprint.json");
    let mut outputs = crate::outputs::Outputs::new();
    outputs.add("--out", out)?;
    outputs.add("the fingerprint", &fingerprint_file)?;
    refuse_data_set_outputs(&outputs, &dataset)?;
    let mut plan = plan(&fingerprint, &data.to_string_lossy(), budget)?;
    if let Some(minutes) = budget.minutes {
        let why = crate::calibrate::plan_minutes(&mut plan.config, minutes)?;
        for field in ["epochs", "batches_per_epoch", "validation.every"] {
            plan.reasons.insert(field.into(), why.clone());
        }
    }
    let header = format!(
        "cwseg plan of {} ({} cases, channels {}); the fingerprint is {}.\n\
         Run it with: cwseg train --config {} --out RUN",
        data.display(),
        fingerprint.cases.len(),
        fingerprint.modalities.join(", "),
        fingerprint_file.display(),
        out.display()
    );
    let toml = commented_toml(&plan, &header)?;
    cwseg_data::dataset::write_atomic(
        &fingerprint_file,
        serde_json::to_string_pretty(&fingerprint)?.as_bytes(),
    )?;
    cwseg_data::dataset::write_atomic(out, toml.as_bytes())?;
    Ok(plan)
}

/// Refuses an `--out` that names a folder (an existing one, or a path ending in `/`): the plan
/// is a file, and the fingerprint beside it would land in the folder's parent.
fn check_out_is_a_file(out: &std::path::Path) -> Result<()> {
    let spelled_as_folder = out
        .as_os_str()
        .to_string_lossy()
        .ends_with(std::path::MAIN_SEPARATOR);
    if spelled_as_folder || out.is_dir() {
        bail!(
            "--out {}: a folder; give the plan's file name (e.g. {}), the fingerprint goes \
             beside it",
            out.display(),
            out.join("plan.toml").display()
        );
    }
    Ok(())
}

/// Refuses outputs that are one of the data set's files (`dataset.json`, an image, a label) or
/// lie in a folder of its cases (`imagesTr/`, a BraTS case folder), where a written file would
/// replace a case or be read as one.
fn refuse_data_set_outputs(outputs: &crate::outputs::Outputs, dataset: &Dataset) -> Result<()> {
    let description = dataset.root.join("dataset.json");
    let mut files: Vec<&std::path::Path> = vec![description.as_path()];
    let mut folders = std::collections::BTreeSet::new();
    for case in dataset.training.iter().chain(&dataset.test) {
        for file in case.images.iter().chain(&case.label) {
            files.push(file);
            if let Some(folder) = file.parent() {
                folders.insert(crate::outputs::resolve(folder));
            }
        }
    }
    let inputs: Vec<(&str, &std::path::Path)> =
        files.into_iter().map(|f| ("of the data set", f)).collect();
    outputs.refuse_inputs(&inputs)?;
    for folder in &folders {
        outputs.refuse_inside(folder, "a folder of the data set's cases")?;
    }
    Ok(())
}

/// What each field of a run configuration is, one line each, by dotted TOML path (model and
/// loss fields by their name alone, as they vary with the network and the loss): the comments
/// of [`commented_toml`] and `cwseg train --print-config`.
const FIELD_DOCS: &[(&str, &str)] = &[
    (
        "patch",
        "training patch [z, y, x] in voxels, also the inference window",
    ),
    (
        "batch_size",
        "patches per batch (the global batch over every data-parallel rank)",
    ),
    (
        "batch_parts",
        "the batch drawn as this many parts, each its own random stream (mpirun -n R: R divides it)",
    ),
    ("epochs", "epochs of the run"),
    ("batches_per_epoch", "optimizer steps per epoch"),
    (
        "seed",
        "seed of everything random: weights, split, patches, augmentation",
    ),
    ("device", "cpu, cuda or cuda:N"),
    ("positive", "weight of patches centred on foreground"),
    ("negative", "weight of patches centred anywhere"),
    ("workers", "loader threads"),
    (
        "contour_maps",
        "volume: each patch's contour map cut from the whole volume's (the paper's); patch: the patch's own",
    ),
    (
        "precision",
        "convolution precision: f32, bf16 (CUDA, or AMX-BF16 CPUs), f16 (CUDA, with loss scaling)",
    ),
    ("data", "the data set"),
    (
        "data.source",
        "synthetic, or a data set folder (MSD / nnU-Net with dataset.json, or BraTS)",
    ),
    ("data.format", "auto, msd, brats or amos"),
    (
        "data.val_fraction",
        "fraction of the training cases held out for validation (a seeded split)",
    ),
    (
        "data.test_fraction",
        "fraction held out for testing (0 when the data set has a test folder)",
    ),
    (
        "data.split",
        "a split file {\"train\": [...], \"val\": [...], \"test\": [...]} instead of a seeded split",
    ),
    (
        "data.max_train_cases",
        "use at most this many training cases",
    ),
    (
        "data.synthetic",
        "the phantom data set when source = \"synthetic\"",
    ),
    ("data.synthetic.train", "training phantoms"),
    ("data.synthetic.test", "test phantoms"),
    ("data.synthetic.seed", "seed of the first phantom"),
    ("data.synthetic.phantom", "the phantom's anatomy and image"),
    (
        "data.preprocessing",
        "what every image goes through before the network (replayed and inverted by predict)",
    ),
    (
        "data.preprocessing.reorient",
        "reorient to RAS+ first (predictions are turned back)",
    ),
    (
        "data.preprocessing.crop_foreground",
        "crop to the box of the non-zero voxels",
    ),
    (
        "data.preprocessing.spacing",
        "resample to this spacing [z, y, x] mm (images trilinear, labels nearest)",
    ),
    (
        "data.preprocessing.normalization",
        "intensity normalisation",
    ),
    (
        "model",
        "the network (in_channels and classes are set from the data)",
    ),
    ("loss", "the loss"),
    (
        "loss.contour",
        "the contour band of contour-weighted losses: a cube of side kernel, eroded iterations times",
    ),
    ("optimizer", "the optimizer"),
    ("optimizer.kind", "adam, adamw or sgd"),
    ("optimizer.lr", "learning rate"),
    (
        "optimizer.weight_decay",
        "weight decay (L2 for adam and sgd, decoupled for adamw)",
    ),
    ("optimizer.betas", "Adam's moment decays"),
    ("optimizer.eps", "Adam's ε"),
    ("optimizer.momentum", "SGD's momentum"),
    ("optimizer.nesterov", "SGD with Nesterov momentum"),
    (
        "schedule",
        "learning-rate schedule: step (halved at 50 % and 75 % of the epochs), cosine, poly, constant",
    ),
    (
        "augment",
        "augmentation of training patches (the paper's rotation and flips, zoom, intensity)",
    ),
    (
        "validation",
        "validation during training (the best checkpoint by mean validation DSC)",
    ),
    ("validation.every", "validate every this many epochs"),
    (
        "validation.overlap",
        "sliding-window overlap of validation predictions",
    ),
    (
        "validation.postprocess",
        "decide nnU-Net's largest-component post-processing after training",
    ),
    (
        "loss_scaling",
        "dynamic loss scaling (auto: on where the precision in effect is f16)",
    ),
    (
        "loss_scaling.kind",
        "auto, none, or dynamic with its own settings",
    ),
    (
        "data.synthetic.phantom.anatomy",
        "abdomen (13 organs) or compact (7 classes)",
    ),
    (
        "data.synthetic.phantom.shape",
        "phantom size [z, y, x] in voxels",
    ),
    (
        "data.synthetic.phantom.spacing",
        "phantom voxel size [z, y, x] mm",
    ),
    (
        "data.synthetic.phantom.noise",
        "σ of the additive Gaussian noise",
    ),
    (
        "data.synthetic.phantom.bias",
        "strength of the smooth intensity bias",
    ),
    (
        "data.synthetic.phantom.blur",
        "Gaussian blur (voxels) before the noise: partial-volume edges",
    ),
    (
        "data.preprocessing.normalization.kind",
        "z_score, z_score_non_zero, percentile_z_score, scale_range, nnunet_ct, clip_z_score or none",
    ),
    (
        "model.name",
        "unet, vnet, unetr, deeplabv3, segresnet, dynunet or swinunetr (their own fields follow)",
    ),
    (
        "model.in_channels",
        "input channels (set from the data set's modalities)",
    ),
    (
        "model.classes",
        "outputs, background included (set from the data set's labels)",
    ),
    (
        "model.filters",
        "filters of the first level, doubled at every down-sampling (dynunet: of every level)",
    ),
    (
        "model.kernel_size",
        "convolution kernel [z, y, x] of every level, level 0 first, the bottleneck last",
    ),
    (
        "model.strides",
        "stride [z, y, x] of every level's first convolution (level 0: 1; 2 pools that axis)",
    ),
    (
        "model.upsample_kernel_size",
        "kernel and stride of the transposed convolution up to each level (strides[1..])",
    ),
    (
        "model.negative_slope",
        "LeakyReLU's slope for negative inputs (0: ReLU)",
    ),
    (
        "model.dropout",
        "dropout probability after every convolution",
    ),
    (
        "model.deep_supr_num",
        "deep-supervision heads on the decoder levels below the output (1, 2, …)",
    ),
    (
        "model.res_block",
        "residual encoder blocks instead of two plain convolutions",
    ),
    ("model.trans_bias", "a bias in the transposed convolutions"),
    ("model.depth", "down-sampling levels"),
    (
        "model.deep_supervision",
        "an output at every decoder level but the lowest for training (nnU-Net's deep supervision)",
    ),
    (
        "model.residual",
        "residual units instead of plain Conv-Norm-ReLU pairs",
    ),
    ("model.norm", "normalisation of the convolution blocks"),
    ("model.norm.kind", "batch, instance or group"),
    (
        "loss.name",
        "ce, dl, gdl, dwce, cedl, cwce, sdl, cwcd, focal, tversky, dicefocal, boundary, cldice, \
         dice_cldice, hausdorff_dt, log_hausdorff_dt, unified_focal, skeleton_recall or \
         dice_ce_skeleton_recall",
    ),
    ("loss.lambda", "λ: the contour weight of CWCE, (1 + λ C) ℓ"),
    (
        "loss.alpha",
        "α: SDL's weight of the contour part against the rest",
    ),
    (
        "loss.preset",
        "paper (docs/formulas.md) or reference (the paper's code)",
    ),
    (
        "loss.contour.kernel",
        "side of the cubic structuring element (3: 26-neighbourhood)",
    ),
    (
        "loss.contour.iterations",
        "erosions: the band's width in voxels",
    ),
    ("loss.contour.element", "cube or cross"),
    (
        "loss.contour.border",
        "background (outside counts as background) or replicate",
    ),
    ("schedule.kind", "step, cosine, poly or constant"),
    (
        "schedule.gamma",
        "the step schedule's factor at each milestone",
    ),
    ("augment.rotation_probability", "probability of a rotation"),
    (
        "augment.max_rotation_degrees",
        "largest rotation angle, degrees",
    ),
    ("augment.flip_probability", "probability of a flip"),
    ("augment.scale_probability", "probability of a zoom"),
    ("augment.scale_range", "zoom factors [low, high]"),
    (
        "augment.intensity_probability",
        "probability of an intensity scale and shift",
    ),
    (
        "augment.intensity_scale",
        "largest relative intensity scale",
    ),
    (
        "augment.intensity_shift",
        "largest intensity shift (in σ of the normalised image)",
    ),
    (
        "augment.rotation_axes",
        "axial (about z, the paper's) or all (about z, y and x, each within ±max: nnU-Net's)",
    ),
    (
        "augment.scale_mode",
        "in_plane_zoom (y and x zoomed by the factor) or isotropic_step (nnU-Net's: the factor is the sampling step along every axis)",
    ),
    (
        "augment.mirror_probability",
        "probability that each of z, y and x is mirrored",
    ),
    ("augment.noise_probability", "probability of Gaussian noise"),
    ("augment.noise_sigma", "the noise's σ range [low, high]"),
    ("augment.blur_probability", "probability of a Gaussian blur"),
    (
        "augment.blur_channel_probability",
        "probability that a blur touches each channel",
    ),
    (
        "augment.blur_sigma",
        "the blur's σ range in voxels (per channel and axis)",
    ),
    (
        "augment.brightness_probability",
        "probability of a brightness factor per channel",
    ),
    ("augment.brightness_range", "brightness factors [low, high]"),
    (
        "augment.contrast_probability",
        "probability of a contrast factor per channel (range kept)",
    ),
    ("augment.contrast_range", "contrast factors [low, high]"),
    (
        "augment.low_resolution_probability",
        "probability of a simulated low resolution",
    ),
    (
        "augment.low_resolution_channel_probability",
        "probability that it touches each channel",
    ),
    (
        "augment.low_resolution_zoom",
        "its zoom range (fraction of voxels kept per axis)",
    ),
    (
        "augment.gamma_inverted_probability",
        "probability of a gamma change of the inverted image",
    ),
    ("augment.gamma_probability", "probability of a gamma change"),
    ("augment.gamma_range", "γ range [low, high]"),
    (
        "loss.contour.iterations_per_axis",
        "erosions per axis [z, y, x] (the band in mm on anisotropic grids), in place of iterations",
    ),
    (
        "regions",
        "region-based training: one sigmoid output per region, labels back by class order",
    ),
    ("regions.names", "a name per region"),
    (
        "regions.labels",
        "the stored label values each region holds",
    ),
    (
        "regions.class_order",
        "the label written where each region's probability exceeds 0.5, regions in order",
    ),
    (
        "data.cross_validation",
        "cross-validation: validate on fold `fold` of `folds`, train on the others",
    ),
];

/// The doc line of the field at `path` (see [`FIELD_DOCS`]).
fn field_doc(path: &str) -> Option<&'static str> {
    FIELD_DOCS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, doc)| *doc)
}

/// The default run configuration as TOML with a comment above every table and every field the
/// docs name: what `cwseg train --print-config` prints.
pub fn default_config_toml() -> Result<String> {
    let plan = Plan {
        config: TrainConfig::default(),
        reasons: BTreeMap::new(),
        details: None,
    };
    commented_toml(
        &plan,
        "cwseg's default run configuration: every field, with what it is.\n\
         cwseg train --config THIS.toml --out RUN (flags override fields; `cwseg plan` fills \
         them from a data set)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contour_band_keeps_its_millimetres_on_every_axis() {
        let contour = |spacing| {
            let mut reasons = BTreeMap::new();
            let loss = contour_loss(spacing, &mut reasons).expect("loss");
            loss.contour().expect("a contour loss")
        };
        // isotropic: one count, the paper's 6 at 1 mm, 3 at 2 mm
        assert_eq!(contour([1.0; 3]).axis_iterations(), [6; 3]);
        assert_eq!(contour([2.0; 3]).iterations_per_axis, None);
        // thick slices: round(6 / s) per axis, 2 along z at 3 mm, 8 in-plane at 0.8 mm
        let thick = contour([3.0, 0.8, 0.8]);
        assert_eq!(thick.iterations_per_axis, Some([2, 8, 8]));
        assert_eq!(thick.axis_iterations(), [2, 8, 8]);
        // never below one erosion
        assert_eq!(contour([20.0, 1.0, 1.0]).axis_iterations(), [1, 6, 6]);
    }

    fn case(spacing: [f64; 3], shape: [usize; 3]) -> CaseFingerprint {
        CaseFingerprint {
            id: String::new(),
            shape,
            foreground_shape: shape,
            spacing,
            orientation: "RAS".into(),
        }
    }

    /// The medians per axis; the coarsest axis takes its 10th percentile only when it is over
    /// 3× the others in spacing and under 1/3 in voxels (numpy's
    /// `np.percentile([4, 5, 5, 5, 6], 10)` = 4.4, by hand), at least the others' + 10⁻⁵.
    #[test]
    fn target_spacing_follows_the_median_and_the_anisotropy_rule() {
        let iso = [
            case([1.0, 0.9, 0.9], [10; 3]),
            case([1.2, 1.0, 1.0], [10; 3]),
            case([1.0, 1.1, 1.1], [10; 3]),
        ];
        assert_eq!(target_spacing(&iso), [1.0, 1.0, 1.0]);
        let even = [
            case([1.0, 1.0, 1.0], [10; 3]),
            case([2.0, 1.0, 1.0], [10; 3]),
        ];
        assert_eq!(target_spacing(&even), [1.5, 1.0, 1.0]);
        let thick = |n: usize, z: &[f64]| -> Vec<CaseFingerprint> {
            z.iter()
                .map(|&z| case([z, 0.8, 0.8], [n, 200, 200]))
                .collect()
        };
        let t = target_spacing(&thick(30, &[5.0, 5.0, 5.0, 4.0, 6.0]));
        assert!((t[0] - 4.4).abs() < 1e-12 && t[1..] == [0.8, 0.8], "{t:?}");
        // as many voxels along z as a third of the others: not anisotropic for nnU-Net
        let t = target_spacing(&thick(70, &[5.0, 5.0, 5.0, 4.0, 6.0]));
        assert_eq!(t, [5.0, 0.8, 0.8]);
        // a 10th percentile finer than the other axes stops just above them
        let t = target_spacing(&thick(30, &[0.5, 0.5, 3.0, 3.0, 3.0]));
        assert_eq!(t, [0.8 + 1e-5, 0.8, 0.8]);
    }

    /// nnU-Net's pooling of the 12 BraTS cases' median (1 mm) and of the CT (3 mm), as its
    /// planner chose them (tests/fixtures/plan_nnunet.json).
    #[test]
    fn pooling_stops_above_four_voxels() {
        let brats = Candidate::new([1.0; 3], [139.0, 171.5, 139.0]);
        assert_eq!(brats.pooling.per_axis, [5; 3]);
        assert_eq!(brats.patch, [160, 192, 160]);
        let ct = Candidate::new([3.0; 3], [112.0, 101.0, 122.0]);
        assert_eq!((ct.pooling.per_axis, ct.patch), ([4; 3], [112, 112, 128]));
        assert_eq!(ct.pooling.unet_depth(), 4);
    }

    /// nnU-Net's kernels: 1 along a thick-slice axis until pooling brings the others within 2×
    /// of it (3.0 mm against 0.8, then 1.6 mm: from stage 1 on), 3 once it is, 3³ at the
    /// bottleneck; the network is a DynUNet of those stages.
    #[test]
    fn kernels_follow_the_spacing_of_each_stage() -> Result<()> {
        let thick = nnunet_pooling([3.0, 0.8, 0.8], [40.0, 256.0, 256.0]);
        assert_eq!(thick.kernels.len(), thick.strides.len() + 1);
        assert_eq!(thick.kernels[0], [1, 3, 3]);
        assert!(thick.kernels[1..].iter().all(|k| *k == [3; 3]));
        let ModelConfig::Dynunet(c) = nnunet_network(&thick, 1, 2)? else {
            bail!("not a DynUNet");
        };
        assert_eq!(c.strides[0], [1; 3]);
        assert_eq!(c.strides[1..], thick.strides[..]);
        assert_eq!(c.upsample_kernel_size, thick.strides);
        assert_eq!(c.filters, nnunet_features(c.strides.len()));
        assert_eq!(nnunet_features(7), [32, 64, 128, 256, 320, 320, 320]);
        assert_eq!(c.deep_supr_num, c.strides.len() - 3);
        // a patch pooled fewer than twice has no DynUNet
        let flat = nnunet_pooling([1.0; 3], [12.0, 12.0, 12.0]);
        assert!(nnunet_network(&flat, 1, 2).is_err());
        Ok(())
    }
}
