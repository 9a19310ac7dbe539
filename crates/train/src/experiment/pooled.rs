//! Post-processing decided on the pooled out-of-fold predictions, as nnU-Net's
//! `find_best_configuration` decides it: once every fold of a network × loss × seed is done,
//! its runs' unprocessed test predictions (every case of the data set, each predicted by the
//! fold that never saw it) are pooled, [`postprocess::decide`] keeps the largest component of a
//! region or class where that does not lower their mean DSC, and the rule is applied to every
//! case: `RUN/predictions-pooled/` in each fold's run, the rule in
//! `RUN/predictions-pooled.rule.json`. The rule is chosen on the cases it is then scored on, as
//! nnU-Net's reported cross-validation is; the tables say so.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cwseg_data::{LabelMap, ReadOptions, read_label, write_label};
use ndarray::Array3;

use super::{RunKey, TableSpec};
use crate::compare::Predictions;
use crate::postprocess::{self, PostProcessing};

/// The label set the rule is decided in: stored label values and class names.
pub(super) struct Classes<'a> {
    pub(super) values: &'a [u8],
    pub(super) names: &'a [String],
}

/// Writes `RUN/predictions-pooled/` for every run in `runs` (each fold's run folder with its
/// test cases) unless each has them, or their metrics, already.
pub(super) fn ensure_pooled(
    runs: &[(PathBuf, Vec<String>)],
    labels: &BTreeMap<String, LabelMap>,
    classes: &Classes,
) -> Result<()> {
    let folder = Predictions::Pooled.folder();
    let present = |dir: &Path| {
        dir.join(folder).is_dir() || dir.join(format!("{folder}.metrics.toml")).is_file()
    };
    if runs.iter().all(|(dir, _)| present(dir)) {
        return Ok(());
    }
    let mut predictions = Vec::new();
    let mut truths = Vec::new();
    let mut indexed = Vec::new();
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
            truths.push(indices(&label.data, classes.values, &path)?);
            indexed.push(indices(&prediction.data, classes.values, &path)?);
            predictions.push((dir, id, prediction));
        }
    }
    let rule = postprocess::decide(&indexed, &truths, classes.names, classes.values);
    for ((dir, id, prediction), mut data) in predictions.into_iter().zip(indexed) {
        rule.apply(&mut data);
        let out = dir.join(folder);
        fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        write_label(
            out.join(format!("{id}.nii.gz")),
            &LabelMap {
                data: data.mapv(|k| classes.values[usize::from(k)]),
                geometry: prediction.geometry,
            },
        )?;
    }
    for (dir, _) in runs {
        write_rule(dir, folder, &rule)?;
    }
    Ok(())
}

/// Stored label values → class indices; a value the data set does not have is an error.
fn indices(values: &Array3<u8>, label_values: &[u8], path: &Path) -> Result<Array3<u8>> {
    let mut lookup = [u8::MAX; 256];
    for (k, &v) in label_values.iter().enumerate() {
        lookup[usize::from(v)] = k as u8;
    }
    if let Some(&v) = values.iter().find(|&&v| lookup[usize::from(v)] == u8::MAX) {
        bail!(
            "{}: label value {v} is not one of the data set's {label_values:?}",
            path.display()
        );
    }
    Ok(values.mapv(|v| lookup[usize::from(v)]))
}

/// `RUN/FOLDER.rule.json`: the rule and the pooled mean DSC before and after it.
fn write_rule(dir: &Path, folder: &str, rule: &PostProcessing) -> Result<()> {
    let path = dir.join(format!("{folder}.rule.json"));
    let text = serde_json::to_string_pretty(rule)
        .with_context(|| format!("{}: the rule as JSON", path.display()))?;
    Ok(cwseg_data::dataset::write_atomic(&path, text.as_bytes())?)
}

/// The Markdown paragraph under a pooled table: each row's rule, read from its first fold's
/// run (`first_fold`), with the pooled mean DSC before and after.
pub(super) fn rules_text(
    table: &TableSpec,
    runs_dir: &Path,
    first_fold: Option<usize>,
) -> Result<String> {
    let mut text = String::from(
        "Post-processing chosen once per network × loss × seed on the pooled unprocessed \
         test predictions of all folds (nnU-Net's `find_best_configuration`) and scored on \
         those same cases, as nnU-Net reports its cross-validation:\n\n",
    );
    for network in &table.networks {
        for loss in &table.losses {
            for &seed in &table.seeds {
                let key = RunKey {
                    network: network.clone(),
                    loss: loss.clone(),
                    seed,
                    fold: first_fold,
                }
                .key();
                let path = runs_dir
                    .join(key)
                    .join(format!("{}.rule.json", Predictions::Pooled.folder()));
                let Ok(json) = fs::read_to_string(&path) else {
                    continue;
                };
                let rule: PostProcessing = serde_json::from_str(&json)
                    .with_context(|| format!("{}: not a post-processing rule", path.display()))?;
                let groups: Vec<&str> = rule.keep_largest.iter().map(|g| g.name.as_str()).collect();
                let kept = if groups.is_empty() {
                    "none".to_string()
                } else {
                    format!("keep the largest component of {}", groups.join(", "))
                };
                let _ = writeln!(
                    text,
                    "- {network} {} seed {seed}: {kept} (pooled mean DSC of {} {:.4} → {:.4})",
                    loss.to_uppercase(),
                    rule.scored.join("/"),
                    rule.validation_dice_before,
                    rule.validation_dice_after
                );
            }
        }
    }
    text.push('\n');
    Ok(text)
}
