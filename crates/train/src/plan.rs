//! `cwseg plan`: from a data set to a run configuration, as nnU-Net plans. Two steps, each data
//! the user can read and edit:
//!
//! - the **fingerprint** ([`fingerprint`]): per case its shape, spacing and channels; per
//!   channel the foreground intensities nnU-Net measures (0.5 / 99.5 percentiles, mean, σ of the
//!   voxels with a label > 0); per class its voxel count. Reading every case is also the
//!   integrity check (nnU-Net's `--verify_dataset_integrity`): images and labels on one grid,
//!   one channel count, known label values, no NaN or ∞, orthogonal axes — errors name the case
//!   and the file.
//! - the **plan** ([`plan`]): the target spacing (the median per axis; an axis more than 3×
//!   coarser than the finest takes its 10th percentile, nnU-Net's anisotropy rule), the patch (the
//!   median case's shape at that spacing, in steps of the network's size multiple, shrunk along
//!   its longest side until a training step of batch 2 fits the memory budget), the
//!   normalisation (CT: nnU-Net's scheme; MR and other modalities: z-score, over the non-zero
//!   voxels when the background is zero, with the crop to them), and the contour band of 6 mm
//!   (docs/formulas.md §7) in erosions at the target spacing's finest axis. Each choice's
//!   reason is written beside it ([`commented_toml`]).

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
    /// Voxels of the box of the non-zero voxels (any channel), what a crop to them keeps.
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
    /// Per channel, the foreground intensities.
    pub intensities: Vec<IntensityProperties>,
    /// Voxels of each stored label value over the training cases.
    pub class_voxels: BTreeMap<u8, u64>,
    /// Fraction of the image voxels (first channel) that are exactly 0, over every case.
    pub zero_fraction: f64,
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
            pool.add(channel, label.data.view())?;
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
        .map(|p| p.properties().map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
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

/// What the planner may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanBudget {
    /// Memory for a training step, GiB.
    pub memory_gib: f64,
}

/// A planned run: the configuration, and the reason of each choice by field.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The run configuration.
    pub config: TrainConfig,
    /// `field → why this value` (dotted TOML paths).
    pub reasons: BTreeMap<String, String>,
}

/// The contour band the paper used, mm (6 erosions of a 3-cube at 1 mm).
pub const BAND_MM: f64 = 6.0;

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

/// The target spacing: the median per axis; an axis more than 3× coarser than the finest axis
/// takes the 10th percentile of its spacings instead (nnU-Net's anisotropy rule).
pub fn target_spacing(cases: &[CaseFingerprint]) -> [f64; 3] {
    let per_axis = |a: usize| cases.iter().map(|c| c.spacing[a]).collect::<Vec<f64>>();
    let mut target: [f64; 3] = std::array::from_fn(|a| median(&mut per_axis(a)));
    let finest = target.iter().copied().fold(f64::INFINITY, f64::min);
    for (a, t) in target.iter_mut().enumerate() {
        if *t > 3.0 * finest {
            *t = percentile(&mut per_axis(a), 10.0);
        }
    }
    target
}

/// The plan for `fingerprint`'s data set at `source` (see the module).
pub fn plan(fingerprint: &Fingerprint, source: &str, budget: PlanBudget) -> Result<Plan> {
    let mut reasons = BTreeMap::new();
    let spacing = target_spacing(&fingerprint.cases);
    let medians: Vec<f64> = (0..3)
        .map(|a| {
            median(
                &mut fingerprint
                    .cases
                    .iter()
                    .map(|c| c.spacing[a])
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    reasons.insert(
        "data.preprocessing.spacing".into(),
        format!(
            "the median spacing {medians:?} mm per axis (z, y, x) of {} cases{}",
            fingerprint.cases.len(),
            if spacing.iter().zip(&medians).any(|(s, m)| s != m) {
                "; an axis over 3× the finest takes its 10th percentile (nnU-Net)"
            } else {
                ""
            }
        ),
    );
    let normalization = normalization(fingerprint, &mut reasons);
    let crop = matches!(normalization, Normalization::ZScoreNonZero);
    // the median case as the network sees it: cropped (when the plan crops), resampled; the
    // patch never exceeds its smallest side
    let sides = |c: &CaseFingerprint| if crop { c.foreground_shape } else { c.shape };
    let shape: [f64; 3] = std::array::from_fn(|a| {
        median(
            &mut fingerprint
                .cases
                .iter()
                .map(|c| sides(c)[a] as f64 * c.spacing[a] / spacing[a])
                .collect::<Vec<_>>(),
        )
    });
    let smallest: [f64; 3] = std::array::from_fn(|a| {
        fingerprint
            .cases
            .iter()
            .map(|c| sides(c)[a] as f64 * c.spacing[a] / spacing[a])
            .fold(f64::INFINITY, f64::min)
    });
    let in_channels = fingerprint.modalities.len();
    let classes = fingerprint.label_values.len();
    let model = ModelConfig::from_name("unet", in_channels, classes)?;
    let patch = fit_patch(&model, shape, smallest, budget, &mut reasons)?;
    reasons.insert(
        "data.preprocessing.crop_foreground".into(),
        if crop {
            format!(
                "{:.0} % of the voxels are 0 (background outside the body): crop to the rest",
                100.0 * fingerprint.zero_fraction
            )
        } else {
            "the images have no zero background to crop".into()
        },
    );
    let finest = spacing.iter().copied().fold(f64::INFINITY, f64::min);
    let iterations = ((BAND_MM / finest).round() as usize).max(1);
    reasons.insert(
        "loss.contour.iterations".into(),
        format!(
            "a {BAND_MM} mm contour band (the paper's 6 erosions at 1 mm) at the finest target \
             spacing {finest} mm"
        ),
    );
    let loss = cwseg_losses::LossConfig::from_json(&format!(
        r#"{{"name": "cwcd", "contour": {{"iterations": {iterations}}}}}"#
    ))?;
    if fingerprint.label_values == [0, 1, 2, 4] {
        reasons.insert(
            "model".into(),
            "BraTS-like labels (1, 2, 4): evaluate with `--regions brats` (WT, TC, ET); region \
             training is not built yet"
                .into(),
        );
    }
    let config = TrainConfig {
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
        batch_size: 2,
        ..TrainConfig::default()
    };
    reasons.insert(
        "batch_size".into(),
        "2: nnU-Net's smallest batch (batch norm needs more than one sample)".into(),
    );
    config
        .validate()
        .context("the plan is not a valid run configuration")?;
    Ok(Plan { config, reasons })
}

/// The patch: the median shape at the target spacing rounded to the network's size multiple
/// (down where the smallest case is shorter: every case must hold a patch), shrunk by one
/// multiple along its longest side until a training step of batch 2 fits `budget`.
fn fit_patch(
    model: &ModelConfig,
    shape: [f64; 3],
    smallest: [f64; 3],
    budget: PlanBudget,
    reasons: &mut BTreeMap<String, String>,
) -> Result<[usize; 3]> {
    let m = model.size_multiple();
    let mut patch: [usize; 3] = std::array::from_fn(|a| {
        let up = ((shape[a] / m as f64).ceil() as usize).max(1) * m;
        let fits = ((smallest[a] / m as f64).floor() as usize).max(1) * m;
        up.min(fits)
    });
    let limit = (budget.memory_gib * f64::from(1u32 << 30)) as u128;
    loop {
        let sized = model.with_input_size(patch);
        let d = cwseg_models::describe(&sized, patch)?;
        let step = 2 * u128::from(d.training_bytes);
        if step <= limit || patch.iter().all(|&p| p == m) {
            reasons.insert(
                "patch".into(),
                format!(
                    "the median case at the target spacing is {:?} voxels; in steps of {m}, the \
                     largest a training step of batch 2 fits in {} GiB (estimated {:.1} GiB)",
                    shape.map(|n| n.round() as usize),
                    budget.memory_gib,
                    step as f64 / f64::from(1u32 << 30)
                ),
            );
            return Ok(patch);
        }
        let (longest, _) = patch
            .iter()
            .enumerate()
            .max_by_key(|&(a, &p)| (p, std::cmp::Reverse(a)))
            .unwrap_or((0, &m));
        patch[longest] = (patch[longest] - m).max(m);
    }
}

/// CT (a modality named `CT`): nnU-Net's scheme, measured on the training cases when a run
/// opens; otherwise z-score, over the non-zero voxels when a fifth or more of the voxels are 0.
fn normalization(
    fingerprint: &Fingerprint,
    reasons: &mut BTreeMap<String, String>,
) -> Normalization {
    let ct = fingerprint
        .modalities
        .iter()
        .any(|m| m.eq_ignore_ascii_case("ct"));
    let (choice, why) = if ct {
        (
            Normalization::NnunetCt,
            "a CT channel: clip to the training foreground's 0.5–99.5 percentiles, then its \
             mean and σ (nnU-Net's CTNormalization)"
                .to_string(),
        )
    } else if fingerprint.zero_fraction >= 0.2 {
        (
            Normalization::ZScoreNonZero,
            "not CT, with a zero background: z-score per case over the non-zero voxels (nnU-Net's \
             ZScoreNormalization with a mask)"
                .to_string(),
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
    let dataset = Dataset::open(data)?;
    let fingerprint = fingerprint(&dataset)?;
    let fingerprint_file = out.with_file_name("fingerprint.json");
    let mut outputs = crate::outputs::Outputs::new();
    outputs.add("--out", out)?;
    outputs.add("the fingerprint", &fingerprint_file)?;
    let plan = plan(&fingerprint, &data.to_string_lossy(), budget)?;
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
        "unet, vnet, unetr or deeplabv3 (their own fields follow)",
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
        "filters of the first level, doubled at every down-sampling",
    ),
    ("model.depth", "down-sampling levels"),
    (
        "model.residual",
        "residual units instead of plain Conv-Norm-ReLU pairs",
    ),
    ("model.norm", "normalisation of the convolution blocks"),
    ("model.norm.kind", "batch, instance or group"),
    (
        "loss.name",
        "ce, dl, gdl, dwce, cedl, cwce, sdl, cwcd, focal, tversky, dicefocal or boundary",
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

    fn case(spacing: [f64; 3]) -> CaseFingerprint {
        CaseFingerprint {
            id: String::new(),
            shape: [10; 3],
            foreground_shape: [10; 3],
            spacing,
            orientation: "RAS".into(),
        }
    }

    /// The medians per axis; an axis over 3× the finest takes its 10th percentile (numpy's
    /// `np.percentile([4, 5, 5, 5, 6], 10)` = 4.4, worked by hand).
    #[test]
    fn target_spacing_follows_the_median_and_the_anisotropy_rule() {
        let iso = [
            case([1.0, 0.9, 0.9]),
            case([1.2, 1.0, 1.0]),
            case([1.0, 1.1, 1.1]),
        ];
        assert_eq!(target_spacing(&iso), [1.0, 1.0, 1.0]);
        let even = [case([1.0, 1.0, 1.0]), case([2.0, 1.0, 1.0])];
        assert_eq!(target_spacing(&even), [1.5, 1.0, 1.0]);
        let thick: Vec<_> = [5.0, 5.0, 5.0, 4.0, 6.0]
            .iter()
            .map(|&z| case([z, 0.8, 0.8]))
            .collect();
        let t = target_spacing(&thick);
        assert!(
            (t[0] - 4.4).abs() < 1e-12 && t[1] == 0.8 && t[2] == 0.8,
            "{t:?}"
        );
    }
}
