//! Ensembles of trained models (nnU-Net's ensembling of folds or configurations): the mean of
//! the members' probabilities on the input's grid, each member with its own preprocessing and
//! blending, then the labels (argmax, or the regions' class order) and the first member's
//! post-processing.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use cwseg_data::{Geometry, Image};
use cwseg_models::Network;
use ndarray::{Array3, Array4};

use crate::card::{ModelCard, load_model};
use crate::predict::{PredictOptions, PreparedCase};
use crate::regions::decide;

/// A trained model: its network, model card and folder.
pub struct Member {
    /// The network.
    pub network: Network,
    /// Its model card.
    pub card: ModelCard,
    /// The folder it was loaded from.
    pub dir: PathBuf,
}

impl Member {
    /// Loads the model in `path` (a model folder, or a run folder's `best/`).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (network, card, dir) = load_model(path, device)?;
        Ok(Member { network, card, dir })
    }
}

/// Refuses members whose probabilities cannot be averaged, naming both folders and what
/// differs: the classes, their label values, the regions or the input modalities.
pub fn check_members(members: &[Member]) -> Result<()> {
    let Some(first) = members.first() else {
        bail!("an ensemble needs at least one model");
    };
    for other in &members[1..] {
        let (a, b) = (&first.card, &other.card);
        let differs = [
            ("classes", a.classes != b.classes),
            ("label values", a.label_values != b.label_values),
            ("regions", a.regions != b.regions),
            ("modalities", a.modalities != b.modalities),
        ];
        if let Some((what, _)) = differs.iter().find(|d| d.1) {
            bail!(
                "the models {} and {} have other {what}: an ensemble averages the probabilities \
                 of one set of classes",
                first.dir.display(),
                other.dir.display()
            );
        }
    }
    Ok(())
}

/// One case predicted by an ensemble: stored label values and, when asked for, the mean
/// probabilities, both on the input's grid.
pub struct EnsemblePrediction {
    /// Stored label values.
    pub labels: Array3<u8>,
    /// The members' mean probabilities `[k, z, y, x]`, when `keep_probabilities`.
    pub probabilities: Option<Array4<f32>>,
}

/// Predicts `image` with every member (each with its own preprocessing, `options`' overlap
/// and mirroring) and averages their probabilities on the input's grid; the labels are the
/// argmax (or the regions' class order) of the mean, post-processed with the first member's
/// rule when `options.postprocess`.
pub fn predict_ensemble(
    members: &[Member],
    image: &Image,
    options: PredictOptions,
    device: &Device,
) -> Result<EnsemblePrediction> {
    let first = members.first().context("an ensemble needs at least one model")?;
    let mean = mean_probabilities(members, image, options, device)?;
    let mut classes = decide(mean.view(), first.card.region_classes()?.as_ref());
    if let (true, Some(rule)) = (options.postprocess, &first.card.postprocessing) {
        rule.apply(&mut classes);
    }
    let values = &first.card.label_values;
    classes.mapv_inplace(|k| values.get(k as usize).copied().unwrap_or(k));
    Ok(EnsemblePrediction {
        labels: classes,
        probabilities: options.keep_probabilities.then_some(mean),
    })
}

/// `(1/M) Σ_m P_m`: the members' probabilities on the input's grid `image.geometry`.
fn mean_probabilities(
    members: &[Member],
    image: &Image,
    options: PredictOptions,
    device: &Device,
) -> Result<Array4<f32>> {
    let keep = PredictOptions {
        keep_probabilities: true,
        ..options
    };
    let mut sum: Option<Array4<f32>> = None;
    for member in members {
        let probabilities = member_probabilities(member, image, keep, device, &image.geometry)
            .with_context(|| format!("the ensemble member {}", member.dir.display()))?;
        match &mut sum {
            None => sum = Some(probabilities),
            Some(s) => *s += &probabilities,
        }
    }
    let mut mean = sum.context("an ensemble needs at least one model")?;
    let m = members.len() as f32;
    mean.mapv_inplace(|p| p / m);
    Ok(mean)
}

fn member_probabilities(
    member: &Member,
    image: &Image,
    options: PredictOptions,
    device: &Device,
    input: &Geometry,
) -> Result<Array4<f32>> {
    let prediction = PreparedCase::new(&member.card, image)?.predict(
        &member.network,
        &member.card,
        options,
        device,
    )?;
    prediction.probabilities_on_input(&member.card, input)
}
