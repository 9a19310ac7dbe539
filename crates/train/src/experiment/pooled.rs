//! Post-processing decided on the pooled out-of-fold predictions, as nnU-Net's
//! `find_best_configuration` decides it: once every fold of a network × loss × seed is done,
//! its runs' unprocessed test predictions (every case of the data set, each predicted by the
//! fold that never saw it) are pooled, [`postprocess::decide`] keeps the largest component of a
//! region or class where that does not lower their mean DSC, and the rule is applied to every
//! case: `RUN/predictions-pooled/` in each fold's run, the rule in
//! `RUN/predictions-pooled.rule.toml` (written last: it marks them complete; made again when
//! the unprocessed predictions are newer). The rule is chosen on the cases it is then scored on, as
//! nnU-Net's reported cross-validation is; the tables say so.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cwseg_data::{LabelMap, ReadOptions, read_label, write_label};
use ndarray::Array3;

use super::RunKey;
use super::tables::Row;
use crate::checkpoint;
use crate::compare::Predictions;
use crate::postprocess::{self, PostProcessing};

/// The label set the rule is decided in: stored label values and class names.
pub(super) struct Classes<'a> {
    pub(super) values: &'a [u8],
    pub(super) names: &'a [String],
}

/// The rule file of a run's pooled predictions, `RUN/predictions-pooled.rule.toml`: written
/// last, so it marks them complete (TOML: its floats hold a NaN score exactly).
fn rule_file(dir: &Path) -> PathBuf {
    dir.join(format!("{}.rule.toml", Predictions::Pooled.folder()))
}

/// Whether a run's pooled predictions (or their metrics, where the predictions are not kept)
/// are complete and newer than its unprocessed predictions.
fn is_current(dir: &Path) -> bool {
    let folder = Predictions::Pooled.folder();
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let Some(rule) = modified(&rule_file(dir)) else {
        return false;
    };
    let scored = dir.join(folder).is_dir() || dir.join(format!("{folder}.metrics.toml")).is_file();
    let inputs = modified(&dir.join(Predictions::Unprocessed.folder()));
    scored && inputs.is_none_or(|t| t <= rule)
}

/// Writes `RUN/predictions-pooled/` and its rule for every run in `runs` (each fold's run
/// folder with its test cases) unless each is current ([`is_current`]).
pub(super) fn ensure_pooled(
    runs: &[(PathBuf, Vec<String>)],
    labels: &BTreeMap<String, LabelMap>,
    classes: &Classes,
) -> Result<()> {
    if runs.iter().all(|(dir, _)| is_current(dir)) {
        return Ok(());
    }
    let mut cases = Vec::new();
    let mut predictions = Vec::new();
    let mut truths = Vec::new();
    for (dir, tests) in runs {
        for id in tests {
            let path = dir
                .join(Predictions::Unprocessed.folder())
                .join(format!("{id}.nii.gz"));
            let prediction = read_label(&path, &ReadOptions::default()).with_context(|| {
                format!(
                    "post-processing on the pooled folds needs every fold's unprocessed \
                     predictions; {} is missing or unreadable",
                    path.display()
                )
            })?;
            let label = labels
                .get(id)
                .with_context(|| format!("no label for test case {id}"))?;
            if prediction.geometry.shape() != label.geometry.shape() {
                bail!(
                    "{}: shape {:?}, the label of {id} has {:?}",
                    path.display(),
                    prediction.geometry.shape(),
                    label.geometry.shape()
                );
            }
            truths.push(indices(
                &label.data,
                classes.values,
                &format!("the label of {id}"),
            )?);
            predictions.push(indices(&prediction.data, classes.values, &path.display())?);
            cases.push((dir, id, prediction.geometry));
        }
    }
    let rule = postprocess::decide(&predictions, &truths, classes.names, classes.values);
    drop(truths);
    let mut predictions = predictions.into_iter();
    for (dir, tests) in runs {
        let run: Vec<_> = cases
            .iter()
            .filter(|(d, _, _)| d == &dir)
            .zip(predictions.by_ref().take(tests.len()))
            .collect();
        checkpoint::replace(&dir.join(Predictions::Pooled.folder()), |out| {
            for ((_, id, geometry), mut data) in run {
                rule.apply(&mut data);
                write_label(
                    out.join(format!("{id}.nii.gz")),
                    &LabelMap {
                        data: data.mapv(|k| classes.values[usize::from(k)]),
                        geometry: geometry.clone(),
                    },
                )?;
            }
            Ok(())
        })?;
        write_rule(dir, &rule)?;
    }
    Ok(())
}

/// Stored label values → class indices; a value the data set does not have is an error naming
/// `what`.
fn indices(
    values: &Array3<u8>,
    label_values: &[u8],
    what: &dyn std::fmt::Display,
) -> Result<Array3<u8>> {
    let mut lookup = [u8::MAX; 256];
    for (k, &v) in label_values.iter().enumerate() {
        lookup[usize::from(v)] = k as u8;
    }
    if let Some(&v) = values.iter().find(|&&v| lookup[usize::from(v)] == u8::MAX) {
        bail!("{what}: label value {v} is not one of the data set's {label_values:?}");
    }
    Ok(values.mapv(|v| lookup[usize::from(v)]))
}

/// `RUN/predictions-pooled.rule.toml`: the rule and the pooled mean DSC before and after it.
fn write_rule(dir: &Path, rule: &PostProcessing) -> Result<()> {
    let path = rule_file(dir);
    let text =
        toml::to_string(rule).with_context(|| format!("{}: the rule as TOML", path.display()))?;
    Ok(cwseg_data::dataset::write_atomic(&path, text.as_bytes())?)
}

/// The Markdown paragraph under a pooled table: each done row and seed's rule, read from its
/// first fold's run (`first_fold`), with the pooled mean DSC before and after.
pub(super) fn rules_text(
    rows: &[Row],
    runs_dir: &Path,
    first_fold: Option<usize>,
) -> Result<String> {
    let mut text = String::from(
        "Post-processing chosen once per network × loss × seed on the pooled unprocessed \
         test predictions of all folds (nnU-Net's `find_best_configuration`) and scored on \
         those same cases, as nnU-Net reports its cross-validation:\n\n",
    );
    for row in rows {
        for &seed in &row.seeds {
            let key = RunKey {
                network: row.network.clone(),
                loss: row.loss.clone(),
                seed,
                fold: first_fold,
            }
            .key();
            let name = format!("{} {} seed {seed}", row.network, row.loss.to_uppercase());
            let path = rule_file(&runs_dir.join(key));
            let Ok(stored) = fs::read_to_string(&path) else {
                let _ = writeln!(text, "- {name}: no rule ({} is missing)", path.display());
                continue;
            };
            let rule: PostProcessing = toml::from_str(&stored)
                .with_context(|| format!("{}: not a post-processing rule", path.display()))?;
            let groups: Vec<&str> = rule.keep_largest.iter().map(|g| g.name.as_str()).collect();
            let kept = if groups.is_empty() {
                "none".to_string()
            } else {
                format!("keep the largest component of {}", groups.join(", "))
            };
            let _ = writeln!(
                text,
                "- {name}: {kept} (pooled mean DSC of {} {:.4} → {:.4})",
                rule.scored.join("/"),
                rule.validation_dice_before,
                rule.validation_dice_after
            );
        }
    }
    text.push('\n');
    Ok(text)
}
