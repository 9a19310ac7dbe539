//! `--collect` (and the end of a grid): every finished run scored, and the tables, their
//! figures, the comparisons and `results.md` written.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use cwseg_metrics::{Aggregate, ClassSet, summarize};

use super::figure::write_table_figure;
use super::pooled::{Classes, rules_text};
use super::scoring::{Scorer, test_labels};
use super::tables::{Row, render_table};
use super::{ExperimentConfig, Regions, TableSpec};
use crate::compare::{ComparisonSpec, Predictions, SeedRuns, compare, render};
use crate::prepare::PreparedData;

/// Scores every finished run's predictions and writes `TABLE.md`, `TABLE.csv`, `TABLE.png`,
/// each comparison's `NAME.md` and `NAME.csv`, and `results.md` (all of them) in `out`.
pub(super) fn collect(config: &ExperimentConfig, out: &Path, data_dir: &Path) -> Result<String> {
    let (data, fold_tests, labels) = test_labels(config, data_dir)?;
    let classes = class_sets(config.regions, &data);
    let mut scorer = Scorer {
        out,
        labels: &labels,
        classes: &classes,
        fold_tests,
        cache: BTreeMap::new(),
        rule_classes: Classes {
            values: &data.dataset.label_values,
            names: &data.dataset.classes,
        },
    };
    let mut report = format!("# Experiment {}\n", config.name);
    if !config.folds.is_empty() {
        let _ = writeln!(
            report,
            "\n{}-fold cross-validation: every table pools the test cases of all folds (each \
             case tested once per seed); a seed enters a row once all its folds are done.",
            config.folds.len()
        );
    }
    for table in &config.tables {
        let rows = score_rows(table, &mut scorer)?;
        let (mut markdown, csv) = render_table(table, &rows, &classes);
        if table.predictions == Predictions::Pooled {
            let first_fold = scorer.fold_tests.first().and_then(|(f, _)| *f);
            markdown.push_str(&rules_text(&rows, &out.join("runs"), first_fold)?);
        }
        let _ = writeln!(
            markdown,
            "![{name}]({name}.png)\n\n`{name}.png`: one axial slice (the one with the most \
             labelled voxels) of the first test case: its first modality, the ground truth, then \
             each row's prediction with seed {seed}, in table order.\n",
            name = table.name,
            seed = table.seeds.first().copied().unwrap_or_default()
        );
        cwseg_data::dataset::write_atomic(
            &out.join(format!("{}.md", table.name)),
            markdown.as_bytes(),
        )?;
        cwseg_data::dataset::write_atomic(
            &out.join(format!("{}.csv", table.name)),
            csv.as_bytes(),
        )?;
        let _ = write!(report, "\n{markdown}");
        let first_fold = labels.keys().next().and_then(|id| scorer.fold_of(id));
        write_table_figure(
            &out.join(format!("{}.png", table.name)),
            &data,
            out,
            &rows,
            table.predictions.folder(),
            (table.seeds.first().copied(), first_fold),
            &labels,
        )?;
    }
    for comparison in &config.comparisons {
        let markdown = write_comparison(comparison, &mut scorer, &classes, out)?;
        let _ = write!(report, "\n{markdown}");
    }
    cwseg_data::dataset::write_atomic(&out.join("results.md"), report.as_bytes())?;
    Ok(report)
}

/// What the tables score: the BraTS regions, or each foreground class of the data set by its
/// stored label value.
fn class_sets(regions: Regions, data: &PreparedData) -> Vec<ClassSet> {
    match regions {
        Regions::Brats => ClassSet::brats(),
        Regions::Classes => (1..data.dataset.classes.len())
            .map(|k| {
                ClassSet::region(
                    &data.dataset.classes[k],
                    &[i64::from(data.dataset.label_values[k])],
                )
            })
            .collect(),
    }
}

/// The rows of `table` (network × loss, in table order), each with the seeds whose runs are
/// done in every fold.
fn score_rows(table: &TableSpec, scorer: &mut Scorer) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for network in &table.networks {
        for loss in &table.losses {
            let mut row = Row {
                network: network.clone(),
                loss: loss.clone(),
                seeds: Vec::new(),
                paper: Vec::new(),
                monai: Vec::new(),
            };
            for &seed in &table.seeds {
                let Some(cases) = scorer.pooled(network, loss, seed, table.predictions)? else {
                    continue;
                };
                row.seeds.push(seed);
                row.paper.push(summarize(&cases, Aggregate::Paper));
                row.monai.push(summarize(&cases, Aggregate::Monai));
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// One comparison from the runs done (a seed enters once both losses have all its folds).
fn write_comparison(
    spec: &ComparisonSpec,
    scorer: &mut Scorer,
    classes: &[ClassSet],
    out: &Path,
) -> Result<String> {
    let mut a = SeedRuns::new();
    let mut b = SeedRuns::new();
    for &seed in &spec.seeds {
        if let (Some(x), Some(y)) = (
            scorer.pooled(&spec.network, &spec.a, seed, spec.predictions)?,
            scorer.pooled(&spec.network, &spec.b, seed, spec.predictions)?,
        ) {
            a.insert(seed, x);
            b.insert(seed, y);
        }
    }
    let folds: BTreeMap<String, usize> = scorer
        .labels
        .keys()
        .map(|id| (id.clone(), scorer.fold_of(id).unwrap_or(0)))
        .collect();
    let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    let lines = compare(&a, &b, &names, &folds);
    let seeds: Vec<u64> = a.keys().copied().collect();
    let (markdown, csv) = render(spec, &lines, &seeds);
    cwseg_data::dataset::write_atomic(&out.join(format!("{}.md", spec.name)), markdown.as_bytes())?;
    cwseg_data::dataset::write_atomic(&out.join(format!("{}.csv", spec.name)), csv.as_bytes())?;
    Ok(markdown)
}
