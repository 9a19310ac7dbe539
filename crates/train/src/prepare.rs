//! From a data set on disk to preprocessed volumes in memory, and the preprocessing record that
//! `predict` replays and inverts.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cwseg_data::{
    BoundingBox, Dataset, ForegroundIntensities, Image, LabelMap, Normalization, PhantomConfig,
    ReadOptions, Split, crop_image, crop_label, foreground_bbox, foreground_voxels_per_case,
    normalize, resample_image, resample_label, write_phantom_dataset,
};
use ndarray::Axis;
use serde::{Deserialize, Serialize};

/// Which reader opens the data folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// BraTS when the folder has case folders and no `dataset.json`, else MSD.
    #[default]
    Auto,
    /// Medical Segmentation Decathlon / nnU-Net v2.
    Msd,
    /// BraTS case folders.
    Brats,
    /// AMOS (MSD layout, 15 organs).
    Amos,
}

/// The synthetic phantom data set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Training phantoms (validation is split from these).
    pub train: usize,
    /// Held-out test phantoms.
    pub test: usize,
    /// Phantom size and quality.
    pub phantom: PhantomConfig,
    /// Seed of the first phantom.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            train: 8,
            test: 4,
            phantom: PhantomConfig {
                shape: [48, 64, 64],
                ..PhantomConfig::default()
            },
            seed: 1000,
        }
    }
}

/// Where the data comes from and how it is split and preprocessed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `synthetic`, or a data set folder.
    pub source: String,
    /// How to read the folder.
    pub format: DataFormat,
    /// The phantom, when `source = "synthetic"`.
    pub synthetic: SyntheticConfig,
    /// A split file (`{"train": [...], "val": [...], "test": [...]}`); otherwise a seeded split.
    pub split: Option<PathBuf>,
    /// Fraction of the training cases held out for validation in a seeded split.
    pub val_fraction: f64,
    /// Fraction held out for testing in a seeded split (0 when the data set has a test folder).
    pub test_fraction: f64,
    /// Cross-validation (nnU-Net's protocol): train on every fold but one, validate on that
    /// one ([`cwseg_data::Split::fold`]); the data set's labelled test folder stays the test
    /// part. Takes the place of `split`, `val_fraction` and `test_fraction`.
    pub cross_validation: Option<CrossValidation>,
    /// Use at most this many training cases (after the split).
    pub max_train_cases: Option<usize>,
    /// Preprocessing; fields left out take the data set's defaults.
    pub preprocessing: Option<Preprocessing>,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: "synthetic".into(),
            format: DataFormat::Auto,
            synthetic: SyntheticConfig::default(),
            split: None,
            val_fraction: 0.2,
            test_fraction: 0.0,
            cross_validation: None,
            max_train_cases: None,
            preprocessing: None,
        }
    }
}

/// One fold of a cross-validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossValidation {
    /// The fold validated on, from 0.
    pub fold: usize,
    /// The number of folds (nnU-Net: 5).
    pub folds: usize,
}

/// What is done to every image before the network sees it; stored in `config.json` so that
/// `predict` does the same and maps its output back to the input's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Preprocessing {
    /// Reorient to the closest canonical orientation (RAS+, nibabel's `as_closest_canonical`,
    /// MONAI's `Orientation("RAS")`) first; `predict` turns its output back, so labels lie on
    /// the input's grid whatever its orientation. Off by default (the cards before it).
    pub reorient: bool,
    /// Crop to the box of non-zero voxels (skull-stripped MRI) first.
    pub crop_foreground: bool,
    /// Resample to this spacing `[z, y, x]` mm.
    pub spacing: Option<[f64; 3]>,
    /// Intensity normalisation per channel (a key its `kind` does not have is refused).
    #[serde(deserialize_with = "strict_normalization")]
    pub normalization: Normalization,
}

/// A [`Normalization`] that refuses keys its kind does not have: serde's derive ignores them
/// for the kinds without fields of an internally tagged enum (`kind = "z_score"` with a
/// misspelt `clip` beside it would be trained silently). The keys given are checked against
/// those the value serializes back to.
fn strict_normalization<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Normalization, D::Error> {
    use serde::de::Error;
    let given = toml::Value::deserialize(deserializer)?;
    let normalization: Normalization = given.clone().try_into().map_err(D::Error::custom)?;
    let known = toml::Value::try_from(normalization).map_err(D::Error::custom)?;
    let (Some(given), Some(known)) = (given.as_table(), known.as_table()) else {
        return Ok(normalization);
    };
    if let Some(key) = given.keys().find(|k| !known.contains_key(*k)) {
        let names: Vec<String> = known.keys().map(|k| format!("`{k}`")).collect();
        return Err(D::Error::custom(format!(
            "unknown field `{key}` for this normalization kind, expected {}",
            names.join(", ")
        )));
    }
    Ok(normalization)
}

impl Default for Preprocessing {
    fn default() -> Self {
        Preprocessing {
            reorient: false,
            crop_foreground: false,
            spacing: None,
            normalization: Normalization::ZScore,
        }
    }
}

impl Preprocessing {
    /// The defaults for a data set: BraTS crops to the brain and normalises its non-zero
    /// voxels (formulas §6); everything else z-scores the whole volume.
    pub fn for_dataset(dataset: &Dataset) -> Self {
        if dataset.name == "BraTS" {
            Preprocessing {
                reorient: false,
                crop_foreground: true,
                spacing: None,
                normalization: Normalization::ZScoreNonZero,
            }
        } else {
            Preprocessing::default()
        }
    }

    /// Applies the preprocessing to an image (and its labels): returns them with the crop box
    /// used (in the voxels of the input, reoriented when `reorient`), for inverting.
    pub fn apply(
        &self,
        image: &Image,
        label: Option<&LabelMap>,
    ) -> Result<(Image, Option<LabelMap>, Option<BoundingBox>)> {
        let (mut image, label, bbox) = self.geometry(image, label)?;
        normalize(&mut image, self.normalization)?;
        Ok((image, label, bbox))
    }

    /// The geometric steps of [`Preprocessing::apply`] (reorientation, crop, resampling),
    /// without the intensity normalisation.
    pub fn geometry(
        &self,
        image: &Image,
        label: Option<&LabelMap>,
    ) -> Result<(Image, Option<LabelMap>, Option<BoundingBox>)> {
        // borrowed until a step makes a new volume: no copy of the whole input
        let (mut image, mut label) = if self.reorient {
            (
                Cow::Owned(image.to_canonical()),
                label.map(|l| Cow::Owned(l.to_canonical())),
            )
        } else {
            (Cow::Borrowed(image), label.map(Cow::Borrowed))
        };
        let mut bbox = None;
        if self.crop_foreground
            && let Some(b) = foreground_bbox(image.data.view())
        {
            image = Cow::Owned(crop_image(&image, &b));
            label = label.map(|l| Cow::Owned(crop_label(&l, &b)));
            bbox = Some(b);
        }
        if let Some(spacing) = self.spacing {
            image = Cow::Owned(resample_image(&image, spacing)?);
            label = label
                .map(|l| resample_label(&l, spacing).map(Cow::Owned))
                .transpose()?;
        }
        Ok((image.into_owned(), label.map(Cow::into_owned), bbox))
    }

    /// Replaces [`Normalization::NnunetCt`] by nnU-Net's `CTNormalization` with the foreground
    /// statistics of the training cases `ids` (its data set fingerprint: reoriented and
    /// cropped as configured, at the original spacing); anything else is kept.
    pub fn measure(mut self, dataset: &Dataset, ids: &[String]) -> Result<Self> {
        if !self.normalization.needs_dataset_statistics() {
            return Ok(self);
        }
        let unresampled = Preprocessing {
            spacing: None,
            ..self
        };
        let mut pool = ForegroundIntensities::new(foreground_voxels_per_case(ids.len()));
        for id in ids {
            let case = dataset
                .case(id)
                .with_context(|| format!("case {id} is not in the data set"))?;
            let (image, label) = dataset.load_case(case, &ReadOptions::default())?;
            let label = label.with_context(|| format!("case {id} has no label file"))?;
            let channels = image.data.dim().0;
            if channels != 1 {
                bail!(
                    "normalization nnunet_ct: case {id} has {channels} channels; the CT scheme \
                     takes one (use z_score or scale_range for several)"
                );
            }
            let (image, label, _) = unresampled.geometry(&image, Some(&label))?;
            let label = label.context("labels lost in preprocessing")?;
            pool.add(image.data.index_axis(Axis(0), 0), label.data.view())
                .with_context(|| format!("case {id}"))?;
        }
        let properties = pool
            .properties()
            .context("normalization nnunet_ct: measuring the training cases")?;
        tracing::info!(?properties, "foreground intensities (nnunet_ct)");
        self.normalization = properties.ct_normalization();
        Ok(self)
    }
}

/// A preprocessed case.
pub struct PreparedCase {
    /// The case's id.
    pub id: String,
    /// The preprocessed image.
    pub image: Image,
    /// The preprocessed labels.
    pub label: LabelMap,
}

/// The opened data set, its split and preprocessing.
pub struct PreparedData {
    /// The data set.
    pub dataset: Dataset,
    /// The split used.
    pub split: Split,
    /// The preprocessing applied.
    pub preprocessing: Preprocessing,
}

/// Opens (or, for `synthetic`, writes into `synthetic_dir` first) the data set and splits it.
pub fn open_data(config: &DataConfig, seed: u64, synthetic_dir: &Path) -> Result<PreparedData> {
    let dataset = if config.source == "synthetic" {
        let root = synthetic_dir.to_path_buf();
        let s = &config.synthetic;
        if root.join("dataset.json").exists() {
            Dataset::msd(&root)?
        } else {
            write_phantom_dataset(&root, s.train, s.test, &s.phantom, s.seed)
                .with_context(|| format!("writing the phantom data set to {}", root.display()))?
        }
    } else {
        let root = Path::new(&config.source);
        match config.format {
            DataFormat::Auto => Dataset::open(root),
            DataFormat::Msd => Dataset::msd(root),
            DataFormat::Brats => Dataset::brats(root),
            DataFormat::Amos => Dataset::amos(root),
        }
        .with_context(|| format!("opening the data set {}", root.display()))?
    };
    let ids: Vec<String> = dataset.training.iter().map(|c| c.id.clone()).collect();
    let mut split = match (&config.split, config.cross_validation) {
        (Some(path), None) => Split::read(path, &dataset)?,
        (Some(path), Some(_)) => bail!(
            "data.split ({}) and data.cross_validation both choose the split: keep one",
            path.display()
        ),
        (None, cross_validation) => {
            let mut split = match cross_validation {
                Some(cv) => {
                    Split::fold(&ids, cv.fold, cv.folds).context("data.cross_validation")?
                }
                None => Split::random(&ids, seed, config.val_fraction, config.test_fraction)?,
            };
            split.test.extend(
                dataset
                    .test
                    .iter()
                    .filter(|c| c.label.is_some())
                    .map(|c| c.id.clone()),
            );
            split
        }
    };
    if let Some(n) = config.max_train_cases {
        split.train.truncate(n);
    }
    if split.train.is_empty() {
        bail!("no training cases in {}", dataset.root.display());
    }
    let preprocessing = config
        .preprocessing
        .unwrap_or_else(|| Preprocessing::for_dataset(&dataset));
    Ok(PreparedData {
        dataset,
        split,
        preprocessing,
    })
}

impl PreparedData {
    /// The data with the split recorded in `path` (a run's `split.json`) instead of a new one:
    /// a resumed run keeps its training, validation and test cases. Cases added to the data
    /// set since are in no part of it, so they are not used (a new run uses them); a recorded
    /// case that is no longer in the data set is an error naming it and the file.
    pub fn with_recorded_split(self, path: &Path) -> Result<Self> {
        let split = Split::read(path, &self.dataset)
            .context("the split recorded when the run started (a resumed run keeps its cases)")?;
        let recorded = split.train.len() + split.val.len() + split.test.len();
        let labelled_tests = self
            .dataset
            .test
            .iter()
            .filter(|c| c.label.is_some())
            .count();
        let unused = (self.dataset.training.len() + labelled_tests).saturating_sub(recorded);
        if unused > 0 {
            tracing::info!(
                unused,
                split = %path.display(),
                "cases of the data set outside the run's recorded split are not used"
            );
        }
        Ok(PreparedData { split, ..self })
    }

    /// Case `id`'s image and labels (class indices) on their own grid, unprocessed: what a
    /// prediction of the case starts from and is scored against.
    pub fn load_input(&self, id: &str) -> Result<(Image, Option<LabelMap>)> {
        let case = self
            .dataset
            .case(id)
            .with_context(|| format!("case {id} is not in the data set"))?;
        Ok(self.dataset.load_case(case, &ReadOptions::default())?)
    }

    /// Reads and preprocesses the cases `ids` (each must have labels), in parallel.
    pub fn load(&self, ids: &[String]) -> Result<Vec<PreparedCase>> {
        use rayon::prelude::*;
        ids.par_iter()
            .map(|id| {
                let case = self
                    .dataset
                    .case(id)
                    .with_context(|| format!("case {id} is not in the data set"))?;
                let (image, label) = self.dataset.load_case(case, &ReadOptions::default())?;
                let label = label.with_context(|| format!("case {id} has no label file"))?;
                let (image, label, _) = self.preprocessing.apply(&image, Some(&label))?;
                let label = label.context("labels lost in preprocessing")?;
                Ok(PreparedCase {
                    id: id.clone(),
                    image,
                    label,
                })
            })
            .collect()
    }
}
