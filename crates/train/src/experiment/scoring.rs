//! Scoring the runs' test predictions: the test cases and labels of every fold, the
//! [`Scorer`] that scores each run once and pools a row's folds, and each predictions folder's
//! metrics kept beside it (`FOLDER.metrics.toml`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cwseg_data::{LabelMap, ReadOptions, read_label};
use cwseg_metrics::{CaseMetrics, ClassSet, evaluate_case};
use serde::{Deserialize, Serialize};

use super::pooled::{Classes, ensure_pooled};
use super::status::is_done;
use super::{ExperimentConfig, RunKey};
use crate::compare::Predictions;
use crate::prepare::{PreparedData, open_data};

/// Scores runs' predictions (each run once) and pools a row's folds.
pub(super) struct Scorer<'a> {
    pub(super) out: &'a Path,
    pub(super) labels: &'a BTreeMap<String, LabelMap>,
    pub(super) classes: &'a [ClassSet],
    /// The test cases of each fold.
    pub(super) fold_tests: Vec<(Option<usize>, Vec<String>)>,
    pub(super) cache: BTreeMap<String, Vec<CaseMetrics>>,
    /// The label values and class names post-processing is decided in.
    pub(super) rule_classes: Classes<'a>,
}

impl Scorer<'_> {
    /// The metrics of every test case of `network` × `loss` × `seed`, all folds together;
    /// `None` until every fold's run is done.
    pub(super) fn pooled(
        &mut self,
        network: &str,
        loss: &str,
        seed: u64,
        predictions: Predictions,
    ) -> Result<Option<Vec<CaseMetrics>>> {
        let mut runs = Vec::new();
        for (fold, tests) in &self.fold_tests {
            let key = RunKey {
                network: network.into(),
                loss: loss.into(),
                seed,
                fold: *fold,
            }
            .key();
            let dir = self.out.join("runs").join(&key);
            if !is_done(&dir)? {
                return Ok(None);
            }
            runs.push((key, dir, tests));
        }
        if predictions == Predictions::Pooled {
            let folds: Vec<(PathBuf, Vec<String>)> = runs
                .iter()
                .map(|(_, dir, tests)| (dir.clone(), tests.to_vec()))
                .collect();
            ensure_pooled(&folds, self.labels, &self.rule_classes)?;
        }
        let mut cases = Vec::new();
        for (key, dir, tests) in runs {
            let cached = format!("{key}/{}", predictions.folder());
            if !self.cache.contains_key(&cached) {
                let folder = dir.join(predictions.folder());
                let scored = scored_run(&folder, tests, self.labels, self.classes)?;
                self.cache.insert(cached.clone(), scored);
            }
            cases.extend(self.cache[&cached].iter().cloned());
        }
        Ok(Some(cases))
    }

    /// The fold whose test set holds `case`.
    pub(super) fn fold_of(&self, case: &str) -> Option<usize> {
        self.fold_tests
            .iter()
            .find(|(_, tests)| tests.iter().any(|t| t == case))
            .and_then(|(f, _)| *f)
    }
}

/// Every fold's test cases, with their labels as stored (the reader gives class indices,
/// BraTS 4 → 3; predictions hold the stored values).
#[allow(clippy::type_complexity)]
pub(super) fn test_labels(
    config: &ExperimentConfig,
    data_dir: &Path,
) -> Result<(
    PreparedData,
    Vec<(Option<usize>, Vec<String>)>,
    BTreeMap<String, LabelMap>,
)> {
    let mut fold_tests = Vec::new();
    let mut labels: BTreeMap<String, LabelMap> = BTreeMap::new();
    let mut first = None;
    for fold in config.fold_ids() {
        let data = open_data(&config.fold_data(fold), 0, data_dir)?;
        for id in &data.split.test {
            if labels.contains_key(id) {
                bail!("test case {id} is in the test set of two folds");
            }
            let (_, label) = data.load_input(id)?;
            let mut label = label.with_context(|| format!("test case {id} has no label file"))?;
            let values = &data.dataset.label_values;
            label
                .data
                .mapv_inplace(|k| values.get(usize::from(k)).copied().unwrap_or(k));
            labels.insert(id.clone(), label);
        }
        fold_tests.push((fold, data.split.test.clone()));
        first.get_or_insert(data);
    }
    let data = first.context("an experiment has at least one fold")?;
    Ok((data, fold_tests, labels))
}

/// The per-case metrics a run's predictions folder `FOLDER` scored, kept beside it as
/// `FOLDER.metrics.toml` (with the test cases and the classes scored): what the tables are made
/// from. Predictions are regenerable and not kept in the repository; the metrics are. TOML, not
/// JSON: its floats hold the NaN and ∞ of empty and failed cases exactly.
#[derive(Debug, Serialize, Deserialize)]
struct ScoredRun {
    /// The test cases, in order.
    cases: Vec<String>,
    /// The classes or regions scored.
    classes: Vec<String>,
    /// Their metrics.
    metrics: Vec<CaseMetrics>,
}

/// The metrics of the predictions in `folder` (see [`ScoredRun`]): scored from the predictions
/// when they are there (and written to `FOLDER.metrics.toml`), else read from that file, which
/// must hold the same cases and classes.
fn scored_run(
    folder: &Path,
    ids: &[String],
    labels: &BTreeMap<String, LabelMap>,
    classes: &[ClassSet],
) -> Result<Vec<CaseMetrics>> {
    let file = folder.with_file_name(format!(
        "{}.metrics.toml",
        folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    if folder.is_dir() {
        let metrics = score_run(folder, ids, labels, classes)?;
        let scored = ScoredRun {
            cases: ids.to_vec(),
            classes: names,
            metrics,
        };
        let text = toml::to_string(&scored)
            .with_context(|| format!("{}: the metrics as TOML", file.display()))?;
        cwseg_data::dataset::write_atomic(&file, text.as_bytes())?;
        return Ok(scored.metrics);
    }
    let text = fs::read_to_string(&file).with_context(|| {
        format!(
            "neither the predictions {} nor their metrics {}",
            folder.display(),
            file.display()
        )
    })?;
    let scored: ScoredRun = toml::from_str(&text)
        .with_context(|| format!("{}: not a run's metrics", file.display()))?;
    if scored.cases != ids || scored.classes != names {
        bail!(
            "{}: scored cases {:?} and classes {:?}, the experiment now asks for {ids:?} and {names:?}; \
             predict the run again (its predictions are not kept)",
            file.display(),
            scored.cases,
            scored.classes
        );
    }
    Ok(scored.metrics)
}

/// Metrics of the predictions of `ids` in a run's predictions folder against their labels, on
/// the labels' grid and spacing.
fn score_run(
    dir: &Path,
    ids: &[String],
    labels: &BTreeMap<String, LabelMap>,
    classes: &[ClassSet],
) -> Result<Vec<CaseMetrics>> {
    let mut cases = Vec::new();
    for id in ids {
        let label = labels
            .get(id)
            .with_context(|| format!("no label for test case {id}"))?;
        let path = dir.join(format!("{id}.nii.gz"));
        let prediction = read_label(&path, &ReadOptions::default())?;
        if prediction.geometry.shape() != label.geometry.shape() {
            bail!(
                "{}: shape {:?}, the label has {:?}",
                path.display(),
                prediction.geometry.shape(),
                label.geometry.shape()
            );
        }
        cases.push(evaluate_case(
            id,
            prediction.data.view(),
            label.data.view(),
            &label.geometry.spacing(),
            classes,
        )?);
    }
    Ok(cases)
}
