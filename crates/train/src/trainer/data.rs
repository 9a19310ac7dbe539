//! A run's data: the data set and split with their preprocessing, the model card sized for
//! them, the patch check, the loader's settings and the training cases ready for sampling.

use std::path::Path;

use anyhow::{Context, Result, bail};
use cwseg_data::{BatchParts, LoaderConfig, PatchMaps, SamplerConfig, SamplingVolume};

use crate::card::ModelCard;
use crate::config::{ContourMaps, TrainConfig};
use crate::prepare::{PreparedCase, PreparedData, open_data};
use crate::regions::RegionClasses;

/// The data set and split of `config` with its preprocessing measured on the training cases,
/// and the model card of the run (the network sized for the data and the patch). The split is
/// the one recorded in `recorded_split` when that file exists (a resumed run keeps its cases:
/// cases added to the data set since are not used, and a recorded case that is gone is an
/// error naming it), else a new one from the configuration.
pub(super) fn open_run_data(
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
    let label_values = &data.dataset.label_values;
    let outputs = match &config.regions {
        Some(regions) => {
            regions
                .validate(label_values)
                .context("the configuration's regions")?;
            regions.labels.len()
        }
        None => data.dataset.classes.len(),
    };
    let model = config
        .model
        .with_io(data.dataset.modalities.len(), outputs)
        .with_input_size(config.patch);
    let multiples = model.size_multiples();
    if (0..3).any(|a| !config.patch[a].is_multiple_of(multiples[a])) {
        bail!(
            "patch {:?}: each side must be a multiple of {multiples:?} (z, y, x) for this network",
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
        regions: config.regions.clone(),
        origin: None,
    };
    Ok((data, card))
}

/// Warns about cases smaller than the patch on some axis: the sampler pads them, centred,
/// images with 0 and labels with background (nnU-Net's `pad_nd_image`), and validation's
/// sliding window pads them likewise, so a plan's patch larger than its smallest case trains.
pub(super) fn warn_small_cases(patch: [usize; 3], cases: &[PreparedCase]) {
    for case in cases {
        let shape = case.image.geometry.shape();
        if (0..3).any(|a| patch[a] > shape[a]) {
            tracing::warn!(
                case = %case.id,
                ?shape,
                ?patch,
                "case smaller than the patch after preprocessing: padded"
            );
        }
    }
}

/// The loader's settings for `config` (two batches prefetched); `regions`, the run's regions
/// in class indices, when it trains regions.
pub(super) fn loader_config(config: &TrainConfig, regions: Option<&RegionClasses>) -> LoaderConfig {
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
        maps: patch_maps(config, regions),
        parts: BatchParts::all(config.batch_parts),
    }
}

/// The maps the loader makes with each patch: under [`ContourMaps::Volume`], the contour map
/// (every class, background included: the loss takes each class's own contour from it) of a
/// loss that uses one; with regions, one map per region. A Skeleton Recall loss gets its tubed
/// skeleton from the loader (thinned in the loader's threads, before deep supervision
/// downsamples it with the labels): under [`ContourMaps::Volume`] made on the patch widened by
/// [`SKELETON_HALO`](cwseg_data::SKELETON_HALO), under [`ContourMaps::Patch`] on the patch alone
/// (the reference's per-patch skeleton).
fn patch_maps(config: &TrainConfig, regions: Option<&RegionClasses>) -> PatchMaps {
    let (contour, skeleton_halo) = match config.contour_maps {
        ContourMaps::Volume => (config.loss.contour(), cwseg_data::SKELETON_HALO),
        ContourMaps::Patch => (None, 0),
    };
    PatchMaps {
        contour: contour.map(|c| cwseg_morphology::ContourSpec {
            erosion: c.erosion(),
            include_background: true,
        }),
        regions: regions.map(|r| r.sets.clone()).unwrap_or_default(),
        skeleton: config.loss.uses_skeleton().then_some(skeleton_halo),
    }
}

/// The training cases ready for sampling; under [`ContourMaps::Volume`] a DWCE loss's weight
/// maps are made here, once per case on the whole preprocessed volume (voxel units, as the
/// loss's own).
pub(super) fn sampling_volumes(
    config: &TrainConfig,
    cases: Vec<PreparedCase>,
) -> Result<Vec<SamplingVolume>> {
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
