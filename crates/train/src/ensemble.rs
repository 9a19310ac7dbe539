//! Ensembles of trained models (nnU-Net's ensembling of folds or configurations): the mean of
//! the members' probabilities on the input's grid, each member with its own preprocessing and
//! blending, then the labels (argmax, or the regions' class order) and the first member's
//! post-processing. An ensemble folder (`ensemble.json`, as `cwseg cv` writes) names its
//! members and the post-processing chosen for them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use cwseg_data::{Geometry, Image};
use cwseg_models::Network;
use ndarray::{Array3, Array4};
use serde::{Deserialize, Serialize};

use crate::card::{ModelCard, load_model};
use crate::postprocess::PostProcessing;
use crate::predict::{PredictOptions, PreparedCase};
use crate::regions::decide;

/// The file that makes a folder an ensemble.
pub const ENSEMBLE_FILE: &str = "ensemble.json";

/// `ensemble.json`: an ensemble's members and its post-processing (nnU-Net's
/// `find_best_configuration` output: folds to average, and the rule chosen on their pooled
/// out-of-fold predictions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleFile {
    /// The members' model or run folders, relative to the ensemble's folder (`../fold_0/best`).
    pub members: Vec<String>,
    /// The ensemble's post-processing, applied to the labels of the mean probabilities in
    /// place of any member's own (`None`: none).
    pub postprocessing: Option<PostProcessing>,
}

impl EnsembleFile {
    /// Reads `path`, refusing a file without members.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: EnsembleFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an ensemble file", path.display()))?;
        if file.members.is_empty() {
            bail!("{}: an ensemble needs at least one member", path.display());
        }
        Ok(file)
    }

    /// Writes it to `dir/ensemble.json` atomically (the folder created if missing).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        cwseg_data::dataset::write_atomic(
            &dir.join(ENSEMBLE_FILE),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )?;
        Ok(())
    }
}

/// The ensemble file `path` stands for: `path/ensemble.json`; else, unless `path` is itself a
/// model or run folder, `path/ensemble/ensemble.json` (a `cwseg cv` folder); `None` for a
/// single model.
pub fn ensemble_file(path: &Path) -> Option<PathBuf> {
    let own = path.join(ENSEMBLE_FILE);
    if own.is_file() {
        return Some(own);
    }
    let model = path.join("config.json").exists() || path.join("best").exists();
    let nested = path.join("ensemble").join(ENSEMBLE_FILE);
    (!model && nested.is_file()).then_some(nested)
}

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

    /// Loads every model `path` stands for: the members of an ensemble folder
    /// ([`ensemble_file`]; member paths relative to the ensemble's folder), with the ensemble's
    /// post-processing on the first member's card (the rule [`predict_ensemble`] and a
    /// one-member prediction apply); else the one model in `path`. A missing member is refused,
    /// naming the ensemble file and the member.
    pub fn load_all(path: &Path, device: &Device) -> Result<Vec<Self>> {
        let Some(file) = ensemble_file(path) else {
            return Ok(vec![Member::load(path, device)?]);
        };
        let ensemble = EnsembleFile::read(&file)?;
        let folder = file.parent().unwrap_or(Path::new("."));
        let mut members = Vec::with_capacity(ensemble.members.len());
        for name in &ensemble.members {
            let dir = folder.join(name);
            if !dir.exists() {
                bail!(
                    "{}: the member {name} ({}) is missing",
                    file.display(),
                    dir.display()
                );
            }
            let member = Member::load(&dir, device)
                .with_context(|| format!("{}: the member {name}", file.display()))?;
            members.push(member);
        }
        check_rule(&file, ensemble.postprocessing.as_ref(), &members[0].card)?;
        members[0].card.postprocessing = ensemble.postprocessing;
        Ok(members)
    }
}

/// Refuses an ensemble's post-processing that names a class the members do not have.
fn check_rule(file: &Path, rule: Option<&PostProcessing>, card: &ModelCard) -> Result<()> {
    let classes = card.classes.len();
    for group in rule.iter().flat_map(|r| &r.keep_largest) {
        if let Some(c) = group.classes.iter().find(|&&c| usize::from(c) >= classes) {
            bail!(
                "{}: postprocessing.keep_largest `{}`: class {c} is not one of the members' \
                 {classes} classes",
                file.display(),
                group.name
            );
        }
    }
    Ok(())
}

/// Refuses members whose probabilities cannot be averaged, naming both folders, what differs
/// (the classes, their label values, the regions or the input modalities) and both values, so
/// that a card to align (a MONAI import's `class_1`, `channel_0`) can be seen.
pub fn check_members(members: &[Member]) -> Result<()> {
    let Some(first) = members.first() else {
        bail!("an ensemble needs at least one model");
    };
    check_distinct(members)?;
    for other in &members[1..] {
        if let Some((what, a, b)) = first_difference(&first.card, &other.card) {
            bail!(
                "the models {} and {} have other {what} ({a} against {b}): an ensemble averages \
                 the probabilities of one set of classes",
                first.dir.display(),
                other.dir.display()
            );
        }
    }
    Ok(())
}

/// Refuses one model twice, by folder or by weights: it would silently weigh double in the
/// mean. A copy of a model folder is the same model (the SHA-256 of its weights, which every
/// card written by `train`, `cv` and `import` records, is the same), named with both folders.
fn check_distinct(members: &[Member]) -> Result<()> {
    let mut folders = std::collections::BTreeSet::new();
    let mut weights: std::collections::BTreeMap<&str, &Path> = std::collections::BTreeMap::new();
    for member in members {
        let resolved = member
            .dir
            .canonicalize()
            .unwrap_or_else(|_| member.dir.clone());
        if !folders.insert(resolved) {
            bail!(
                "the model {} is in the ensemble twice: each member's probabilities count once \
                 in the mean",
                member.dir.display()
            );
        }
        let Some(digest) = member.card.weights_sha256.as_deref() else {
            continue;
        };
        if let Some(first) = weights.insert(digest, &member.dir) {
            bail!(
                "the models {} and {} have the same weights (SHA-256 {digest}): one model \
                 twice in the ensemble would weigh double in the mean",
                first.display(),
                member.dir.display()
            );
        }
    }
    Ok(())
}

/// The first of the fields members must share that differs between `a` and `b`, with both
/// values as the card writes them (JSON).
fn first_difference(a: &ModelCard, b: &ModelCard) -> Option<(&'static str, String, String)> {
    fn pair<T: Serialize>(x: &T, y: &T) -> (String, String) {
        let json = |v: &T| serde_json::to_string(v).unwrap_or_default();
        (json(x), json(y))
    }
    let fields = [
        ("classes", pair(&a.classes, &b.classes)),
        ("label values", pair(&a.label_values, &b.label_values)),
        ("regions", pair(&a.regions, &b.regions)),
        ("modalities", pair(&a.modalities, &b.modalities)),
    ];
    fields
        .into_iter()
        .find(|(_, (x, y))| x != y)
        .map(|(what, (x, y))| (what, x, y))
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
    let first = members
        .first()
        .context("an ensemble needs at least one model")?;
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
