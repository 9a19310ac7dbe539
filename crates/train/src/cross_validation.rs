//! `cwseg cv`: nnU-Net's cross-validation in one command. Each fold `K` of `N` is trained into
//! `OUT/fold_K` (`data.cross_validation`, no post-processing decided per fold); every fold's
//! validation cases are predicted with its best checkpoint (out-of-fold, on the input's grid,
//! unprocessed) into `OUT/oof/`; the post-processing is chosen once on the pooled out-of-fold
//! predictions (nnU-Net's `find_best_configuration` step, [`postprocess::decide`]); `cv.json`
//! and `cv.md` report the DSC and HD95 before and after it, and `ensemble/ensemble.json` names
//! the folds' checkpoints and the rule, so that `cwseg predict --model OUT/ensemble` predicts
//! with the mean of the folds. Run again, it trains no complete fold, resumes an interrupted
//! one ([`train_to_end`]) and predicts again only what a fold's newer weights changed.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use cwseg_data::{LabelMap, ReadOptions, read_label, write_label};
use cwseg_metrics::{Aggregate, CaseMetrics, ClassSet, Means, Status, evaluate_case, summarize};
use cwseg_models::Network;
use ndarray::Array3;
use serde::{Deserialize, Serialize};

use crate::card::{ModelCard, load_model};
use crate::config::TrainConfig;
use crate::device::parse_device;
use crate::ensemble::EnsembleFile;
use crate::outputs::modified;
use crate::postprocess::{self, ClassGroup, PostProcessing};
use crate::predict::{PredictOptions, predict_case};
use crate::prepare::{CrossValidation, PreparedData, open_data};
use crate::trainer::{TrainHooks, train_to_end};

/// What `cv.json` holds: the out-of-fold scores of every case before and after the
/// post-processing chosen on them, and their means. Classes are the BraTS regions where the
/// label values are BraTS's, else the foreground classes; a value that is not finite (DSC of a
/// class in neither volume, HD95 with an empty side) is `null`, its `status` saying why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CvReport {
    /// The number of folds.
    pub folds: usize,
    /// How the means are taken: MONAI's (cases without the class in the label are skipped).
    pub aggregate: Aggregate,
    /// The classes (or regions) scored, the order of every list below.
    pub classes: Vec<String>,
    /// The post-processing chosen on the pooled out-of-fold predictions.
    pub postprocessing: PostProcessing,
    /// Means before the post-processing.
    pub before: CvMeans,
    /// Means after it.
    pub after: CvMeans,
    /// Every training case once, by fold, then by id.
    pub cases: Vec<CvCase>,
}

/// Means over the cases of a [`CvReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CvMeans {
    /// The mean over the classes of the per-class mean DSC.
    pub mean_dice: Option<f64>,
    /// The mean over the classes of the per-class mean HD95, mm.
    pub mean_hausdorff95: Option<f64>,
    /// Per class, the mean DSC.
    pub dice: Vec<Option<f64>>,
    /// Per class, the mean HD95 (finite values), mm.
    pub hausdorff95: Vec<Option<f64>>,
}

/// One case's out-of-fold scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CvCase {
    /// The case id (its prediction is `oof/<case>.nii.gz`).
    pub case: String,
    /// The fold that validated it.
    pub fold: usize,
    /// Before the post-processing.
    pub before: CaseScores,
    /// After it.
    pub after: CaseScores,
}

/// One case's per-class scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseScores {
    /// DSC per class.
    pub dice: Vec<Option<f64>>,
    /// HD95 per class, mm.
    pub hausdorff95: Vec<Option<f64>>,
    /// How each class fared (`ok`, `empty`, `failure`, `spurious`).
    pub status: Vec<Status>,
}

/// The fold `fold` of `folds` of `config`: its cases from `data.cross_validation`, and no
/// post-processing decided on its own validation cases (it is chosen on all folds' together).
pub fn fold_config(config: &TrainConfig, fold: usize, folds: usize) -> TrainConfig {
    let mut fold_config = config.clone();
    fold_config.data.cross_validation = Some(CrossValidation { fold, folds });
    fold_config.validation.postprocess = false;
    fold_config
}

/// The run folder of fold `fold`: `out/fold_<fold>`.
pub fn fold_dir(out: &Path, fold: usize) -> PathBuf {
    out.join(format!("fold_{fold}"))
}

/// Trains every fold of `config` into `out/fold_K` (a complete fold is skipped, an
/// interrupted one resumes).
fn train_folds(
    config: &TrainConfig,
    out: &Path,
    folds: usize,
    hooks: &mut dyn TrainHooks,
) -> Result<()> {
    let data_dir = out.join("data");
    for fold in 0..folds {
        let dir = fold_dir(out, fold);
        tracing::info!("fold {}/{folds}: {}", fold + 1, dir.display());
        let what = format!("fold {fold} ({})", dir.display());
        let fold_config = fold_config(config, fold, folds);
        let outcome = train_to_end(&fold_config, &dir, &data_dir, hooks, &what)
            .with_context(|| format!("fold {fold} of {folds} ({})", dir.display()))?;
        if outcome.is_none() {
            tracing::info!("fold {}/{folds}: complete, nothing to train", fold + 1);
        }
    }
    Ok(())
}

/// Runs the cross-validation of `config` with `folds` folds in `out` (see the module's
/// documentation); `hooks` watch each fold's training. Returns the report written to `cv.json`.
pub fn run(
    config: &TrainConfig,
    out: &Path,
    folds: usize,
    hooks: &mut dyn TrainHooks,
) -> Result<CvReport> {
    if folds < 2 {
        bail!("--folds {folds}: a cross-validation needs at least 2 folds");
    }
    refuse_out_in_data(config, out)?;
    let fresh = !out.exists();
    let trained = train_folds(config, out, folds, hooks);
    if trained.is_err() && fresh && !fold_dir(out, 0).exists() {
        // refused before any fold had a run (folds > cases, a bad configuration): the folder
        // holds only what this call made, as a refused `train` leaves no folder
        let _ = std::fs::remove_dir_all(out);
    }
    trained?;
    let device = parse_device(&config.device)?;
    let mut pooled = Pooled::default();
    for fold in 0..folds {
        tracing::info!("fold {}/{folds}: predicting its validation cases", fold + 1);
        pooled.predict_fold(config, out, fold, folds, &device)?;
    }
    let report = pooled.report(folds)?;
    write_report(out, &report)?;
    let ensemble = EnsembleFile {
        members: (0..folds).map(|k| format!("../fold_{k}/best")).collect(),
        postprocessing: Some(report.postprocessing.clone()),
    };
    ensemble.write(&out.join("ensemble"))?;
    Ok(report)
}

/// Refuses a cross-validation folder that is the data set's folder or lies inside it: its
/// `fold_K/` folders would be read as cases of a BraTS folder (the first fold then failed with
/// "missing fold_0/fold_0_flair.nii.gz") and mix with an MSD folder's.
fn refuse_out_in_data(config: &TrainConfig, out: &Path) -> Result<()> {
    if config.data.source == "synthetic" {
        return Ok(());
    }
    let data = Path::new(&config.data.source);
    if crate::outputs::resolve(out).starts_with(crate::outputs::resolve(data)) {
        bail!(
            "--out {} lies inside the data set {}: its fold folders would be read as cases; \
             write the cross-validation elsewhere",
            out.display(),
            data.display()
        );
    }
    Ok(())
}

/// The out-of-fold predictions of every fold and their labels, class indices on the input's
/// grid, one entry per case.
#[derive(Default)]
struct Pooled {
    /// The first fold's model card (every fold has the same classes).
    card: Option<ModelCard>,
    /// `(case, fold)`.
    cases: Vec<(String, usize)>,
    predictions: Vec<Array3<u8>>,
    labels: Vec<Array3<u8>>,
    /// Each label's voxel spacing, mm.
    spacings: Vec<[f64; 3]>,
}

impl Pooled {
    /// Adds fold `fold`'s validation cases (those its `split.json` recorded), each predicted
    /// with the fold's best checkpoint ([`out_of_fold`]).
    fn predict_fold(
        &mut self,
        config: &TrainConfig,
        out: &Path,
        fold: usize,
        folds: usize,
        device: &Device,
    ) -> Result<()> {
        let dir = fold_dir(out, fold);
        let fold_config = fold_config(config, fold, folds);
        let opened = open_data(&fold_config.data, fold_config.seed, &out.join("data"))?;
        let own = opened.split.val.clone();
        let recorded = dir.join("split.json");
        let data = opened.with_recorded_split(&recorded)?;
        check_recorded_fold(&recorded, fold, folds, &own, &data.split.val)?;
        let (network, card, best) = load_model(&dir, device)?;
        self.check_card(&card, &best)?;
        let model = Model {
            network: &network,
            card: &card,
            trained: modified(&best.join("model.safetensors"))?,
            device,
        };
        let oof = out.join("oof");
        fs::create_dir_all(&oof).with_context(|| format!("creating {}", oof.display()))?;
        let mut ids = data.split.val.clone();
        ids.sort();
        for id in &ids {
            if self.cases.iter().any(|(c, _)| c == id) {
                bail!(
                    "case {id} is a validation case of two folds ({})",
                    dir.display()
                );
            }
            let path = oof.join(format!("{id}.nii.gz"));
            let (prediction, label) = out_of_fold(&data, id, &model, &path)?;
            self.cases.push((id.clone(), fold));
            self.predictions.push(prediction);
            self.spacings.push(label.geometry.spacing());
            self.labels.push(label.data);
        }
        self.card.get_or_insert(card);
        Ok(())
    }

    /// Refuses a fold whose model has other classes than the first fold's.
    fn check_card(&self, card: &ModelCard, best: &Path) -> Result<()> {
        match &self.card {
            Some(first)
                if (&first.classes, &first.label_values) != (&card.classes, &card.label_values) =>
            {
                bail!(
                    "{}: classes {:?} (label values {:?}), the first fold's are {:?} ({:?}); the folds of one cross-validation share their classes",
                    best.join("config.json").display(),
                    card.classes,
                    card.label_values,
                    first.classes,
                    first.label_values
                )
            }
            _ => Ok(()),
        }
    }

    /// Chooses the post-processing on the pooled predictions and scores them before and after.
    fn report(self, folds: usize) -> Result<CvReport> {
        let card = self
            .card
            .as_ref()
            .context("no fold has a validation case")?;
        let rule = postprocess::decide(
            &self.predictions,
            &self.labels,
            &card.classes,
            &card.label_values,
        );
        let processed: Vec<Array3<u8>> = self
            .predictions
            .iter()
            .map(|p| {
                let mut p = p.clone();
                rule.apply(&mut p);
                p
            })
            .collect();
        let groups = scored_groups(card);
        let before = self.score(&self.predictions, &groups)?;
        let after = self.score(&processed, &groups)?;
        let cases = self
            .cases
            .iter()
            .zip(before.iter().zip(&after))
            .map(|((case, fold), (b, a))| CvCase {
                case: case.clone(),
                fold: *fold,
                before: case_scores(b),
                after: case_scores(a),
            })
            .collect();
        Ok(CvReport {
            folds,
            aggregate: Aggregate::Monai,
            classes: groups.iter().map(|g| g.name.clone()).collect(),
            postprocessing: rule,
            before: means(&before),
            after: means(&after),
            cases,
        })
    }

    /// The metrics of `predictions` (one per pooled case) against the labels, per group.
    fn score(&self, predictions: &[Array3<u8>], groups: &[ClassGroup]) -> Result<Vec<CaseMetrics>> {
        let sets: Vec<ClassSet> = groups
            .iter()
            .map(|g| {
                let classes: Vec<i64> = g.classes.iter().map(|&c| i64::from(c)).collect();
                ClassSet::region(&g.name, &classes)
            })
            .collect();
        self.cases
            .iter()
            .zip(predictions.iter().zip(&self.labels))
            .zip(&self.spacings)
            .map(|(((case, _), (p, l)), spacing)| {
                evaluate_case(case, p.view(), l.view(), spacing, &sets)
                    .with_context(|| format!("scoring case {case}"))
            })
            .collect()
    }
}

/// Refuses a fold whose recorded validation cases (`recorded`, its `split.json`) are not the
/// fold's own share of the data set's cases (`own`): an edited or damaged `split.json`, or
/// cases added to the data set since the fold trained, would otherwise leave cases out of the
/// out-of-fold scores (or score a case the fold trained on) without a word.
fn check_recorded_fold(
    recorded: &Path,
    fold: usize,
    folds: usize,
    own: &[String],
    validated: &[String],
) -> Result<()> {
    let sorted = |ids: &[String]| {
        let mut ids = ids.to_vec();
        ids.sort();
        ids
    };
    let (own, validated) = (sorted(own), sorted(validated));
    if own != validated {
        bail!(
            "{}: fold {fold} of {folds} validates {validated:?}, but its share of the data \
             set's cases is {own:?} (an edited or damaged split.json, or cases added to the \
             data set since the fold trained); restore the file, or remove {} to train the fold \
             again",
            recorded.display(),
            recorded.parent().unwrap_or(Path::new(".")).display()
        );
    }
    Ok(())
}

/// A fold's model, as [`out_of_fold`] predicts with it.
struct Model<'a> {
    network: &'a Network,
    card: &'a ModelCard,
    /// When its weights were written: an out-of-fold prediction written since is theirs.
    trained: Option<std::time::SystemTime>,
    device: &'a Device,
}

/// Case `id`'s out-of-fold prediction (class indices) and its labels (class indices, with
/// their grid): read back from `path` when it was written after the model's weights, else
/// predicted on the input's grid without post-processing and written to `path` (atomically).
fn out_of_fold(
    data: &PreparedData,
    id: &str,
    model: &Model,
    path: &Path,
) -> Result<(Array3<u8>, LabelMap)> {
    let (image, label) = data.load_input(id)?;
    let label = label.with_context(|| format!("validation case {id} has no label file"))?;
    let current = match (modified(path)?, model.trained) {
        (Some(written), Some(trained)) => written >= trained,
        _ => false,
    };
    let cached = if current {
        read_cached(path, &label, &model.card.label_values)
    } else {
        None
    };
    let classes = match cached {
        Some(classes) => classes,
        None => {
            let values = predict_and_write(&image, id, model, path)?;
            class_indices(values, &model.card.label_values, path)?
        }
    };
    Ok((classes, label))
}

/// Case `id`'s labels (stored values) predicted on the input's grid without post-processing,
/// written to `path` (atomically).
fn predict_and_write(
    image: &cwseg_data::Image,
    id: &str,
    model: &Model,
    path: &Path,
) -> Result<Array3<u8>> {
    let options = PredictOptions {
        overlap: model.card.overlap,
        postprocess: false,
        mirror: false,
        keep_probabilities: false,
    };
    let labels = predict_case(model.network, model.card, image, options, model.device)
        .with_context(|| format!("predicting validation case {id}"))?
        .labels;
    write_label(
        path,
        &LabelMap {
            data: labels.clone(),
            geometry: image.geometry.clone(),
        },
    )?;
    Ok(labels)
}

/// The class indices of the out-of-fold prediction already at `path`, or `None` (with a
/// warning) when it cannot be used: unreadable (an interrupted copy, a damaged disk), on
/// another grid than the case's `label`, or holding a value the model lacks. The file is a
/// cache of a prediction cv can make again, so a damaged one is predicted anew rather than
/// stopping every rerun.
fn read_cached(path: &Path, label: &LabelMap, label_values: &[u8]) -> Option<Array3<u8>> {
    let usable = read_label(path, &ReadOptions::default())
        .map_err(anyhow::Error::from)
        .and_then(|cached| {
            if cached.geometry.shape() != label.geometry.shape() {
                bail!(
                    "{}: shape {:?}, the case's is {:?}",
                    path.display(),
                    cached.geometry.shape(),
                    label.geometry.shape()
                );
            }
            class_indices(cached.data, label_values, path)
        });
    match usable {
        Ok(classes) => Some(classes),
        Err(e) => {
            tracing::warn!("{e:#}; predicting it again");
            None
        }
    }
}

/// Stored label values turned back into class indices (their positions in `label_values`);
/// a value the model does not have is an error naming `path`.
fn class_indices(mut values: Array3<u8>, label_values: &[u8], path: &Path) -> Result<Array3<u8>> {
    let mut index = [None; 256];
    for (k, &v) in label_values.iter().enumerate() {
        index[usize::from(v)] = Some(k as u8);
    }
    if let Some(v) = values.iter().find(|&&v| index[usize::from(v)].is_none()) {
        bail!(
            "{}: label value {v} is not one of the model's {label_values:?}",
            path.display()
        );
    }
    values.mapv_inplace(|v| index[usize::from(v)].unwrap_or(0));
    Ok(values)
}

/// What is scored: the BraTS regions where the label values are BraTS's, else each foreground
/// class (the groups [`postprocess::decide`] scores).
fn scored_groups(card: &ModelCard) -> Vec<ClassGroup> {
    postprocess::brats_regions(&card.label_values).unwrap_or_else(|| {
        (1..card.classes.len())
            .map(|k| ClassGroup {
                name: card.classes[k].clone(),
                classes: vec![k as u8],
            })
            .collect()
    })
}

/// `x` where it is finite.
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn case_scores(metrics: &CaseMetrics) -> CaseScores {
    CaseScores {
        dice: metrics
            .classes
            .iter()
            .map(|(_, m)| finite(m.dice))
            .collect(),
        hausdorff95: metrics
            .classes
            .iter()
            .map(|(_, m)| finite(m.hausdorff95))
            .collect(),
        status: metrics.classes.iter().map(|(_, m)| m.status).collect(),
    }
}

/// MONAI's means (formulas §5): per class over the cases with the class in the label, then
/// over the classes that have one.
fn means(metrics: &[CaseMetrics]) -> CvMeans {
    let summary = summarize(metrics, Aggregate::Monai);
    let per_class = |f: fn(&Means) -> Option<f64>| -> Vec<Option<f64>> {
        summary.classes.iter().map(|c| f(&c.means)).collect()
    };
    CvMeans {
        mean_dice: summary.average.dice,
        mean_hausdorff95: summary.average.hausdorff95,
        dice: per_class(|m| m.dice),
        hausdorff95: per_class(|m| m.hausdorff95),
    }
}

/// Writes `out/cv.json` and `out/cv.md` (atomically).
fn write_report(out: &Path, report: &CvReport) -> Result<()> {
    cwseg_data::dataset::write_atomic(
        &out.join("cv.json"),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    cwseg_data::dataset::write_atomic(&out.join("cv.md"), report.markdown(true).as_bytes())?;
    Ok(())
}

/// A score for a table: four decimals, or `-` where there is none.
fn show(x: Option<f64>, decimals: usize) -> String {
    x.map_or_else(|| "-".to_string(), |x| format!("{x:.decimals$}"))
}

impl CvReport {
    /// The report as Markdown: the rule, the per-class means before and after it, and with
    /// `per_case` every case's DSC before → after.
    pub fn markdown(&self, per_case: bool) -> String {
        let mut text = format!(
            "# Cross-validation, {} folds\n\nOut-of-fold predictions of each fold's best \
             checkpoint (`oof/`), scored against the labels; means over the cases whose label \
             holds the class (MONAI). Post-processing chosen on them: {}.\n\n",
            self.folds,
            rule_text(&self.postprocessing)
        );
        text.push_str("| class | DSC before | DSC after | HD95 before (mm) | HD95 after (mm) |\n");
        text.push_str("|---|---|---|---|---|\n");
        let (b, a) = (&self.before, &self.after);
        for (k, name) in self.classes.iter().enumerate() {
            let _ = writeln!(
                text,
                "| {name} | {} | {} | {} | {} |",
                show(b.dice[k], 4),
                show(a.dice[k], 4),
                show(b.hausdorff95[k], 2),
                show(a.hausdorff95[k], 2)
            );
        }
        let _ = writeln!(
            text,
            "| mean | {} | {} | {} | {} |",
            show(b.mean_dice, 4),
            show(a.mean_dice, 4),
            show(b.mean_hausdorff95, 2),
            show(a.mean_hausdorff95, 2)
        );
        if per_case {
            text.push_str(&self.case_table());
        }
        text
    }

    /// Every case's DSC per class, before → after the post-processing.
    fn case_table(&self) -> String {
        let mut text = String::from("\n## Per case: DSC before → after\n\n| case | fold |");
        for name in &self.classes {
            let _ = write!(text, " {name} |");
        }
        text.push_str("\n|---|---|");
        text.push_str(&"---|".repeat(self.classes.len()));
        text.push('\n');
        for case in &self.cases {
            let _ = write!(text, "| {} | {} |", case.case, case.fold);
            for (b, a) in case.before.dice.iter().zip(&case.after.dice) {
                let _ = write!(text, " {} → {} |", show(*b, 4), show(*a, 4));
            }
            text.push('\n');
        }
        text
    }
}

/// The rule in words: the groups whose largest component is kept, or none.
fn rule_text(rule: &PostProcessing) -> String {
    if rule.keep_largest.is_empty() {
        return "none (keeping the largest component lowered the DSC or changed nothing)".into();
    }
    let names: Vec<&str> = rule.keep_largest.iter().map(|g| g.name.as_str()).collect();
    format!(
        "keep the largest connected component of {}",
        names.join(", ")
    )
}
